"""Operations: units of work, each one transaction (or one self-contained
statement), all-or-nothing, retried on transient conflicts.

``admin`` (organizations, projects, products, keys, limits and budgets),
``validation`` (the metered validation), ``charges``, ``holds`` (reserve and
settle), ``release`` (release and expiry); ``refusals`` turns a rolled-back
refusal into the error that names what refused, ``results`` builds results and
delivers alerts after commit, ``units`` holds what they share (retries,
idempotency, the key's lock). ``authcache`` remembers read-path validations in
this process. The statements they string together live in ``keycap._db``.
"""
