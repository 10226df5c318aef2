"""The rules: pure logic with no I/O, each testable without a database.

The key format and its checksum (``tokens``, ``base62``), digests and the pepper
ring (``hashing``), scopes and the grant rule (``scopes``, ``policy``), rate
windows (``rate_limits``), budget periods and budget state (``periods``,
``budgets``), exact money (``money``), ids, time and input checks (``ids``,
``timeutil``, ``inputs``), and how money moves between budgets and the ledger
(``movements``). Time is always passed in: nothing here reads a clock.
"""
