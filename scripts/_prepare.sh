# Sourced (not run) by scripts/test and scripts/bench: install keycap, start
# PostgreSQL and MariaDB, and export their URLs into the calling shell.
prepare_databases() {
  scripts/bootstrap
  local db_env
  # Not eval "$(…)" directly: that would hide a failure of scripts/databases.
  db_env=$(scripts/databases)
  if grep -qv '^export ' <<<"$db_env"; then
    echo "$0: scripts/databases printed more than export lines:" >&2
    echo "$db_env" >&2
    exit 1
  fi
  eval "$db_env"
}

# Debian's Chromium for the browser tests (tests/_browser.py); Playwright comes
# with the dev extra and drives this browser, never one it downloads.
prepare_browser() {
  if [ ! -x "${KEYCAP_CHROMIUM:-/usr/bin/chromium}" ]; then
    echo "$0: installing Chromium (apt-get)" >&2
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  fi
  export KEYCAP_REQUIRE_BROWSER=1
}
