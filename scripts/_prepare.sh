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
