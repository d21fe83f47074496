# shellcheck shell=bash
# Helpers for the launchers in this folder; sourced, never run. Each launcher sets `dry_run`.

die() {  # a usage error: prints the message and the launcher's usage to stderr, then exits 2
  printf '%s: %s\n\n' "${0##*/}" "$1" >&2
  usage >&2
  exit 2
}

fail() {  # any other error: prints the message to stderr, then exits 1
  printf '%s: %s\n' "${0##*/}" "$1" >&2
  exit 1
}

common_option() {  # an option every launcher takes: --dry-run, -h, --config.a.b=value
  case $1 in
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --config.*) train_args+=("$1") ;;
    *) die "unknown option: $1" ;;
  esac
}

usage() {  # the launcher's header comment (the `# ` lines before its first command)
  sed -n '/^[^#]/q; s/^# //p; s/^#$//p' "$0"
}

quote() {  # the arguments as one line that a shell splits back into the same words
  local arg words=()
  for arg; do
    if [[ $arg =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
  done
  printf '%s' "${words[*]}"
}

show() {  # prints a command, `+ ` first
  printf '+ %s\n' "$(quote "$@")"
}

show_env() {  # prints `export NAME=value` for each variable named
  local name
  for name; do printf 'export %s=%s\n' "$name" "$(quote "${!name}")"; done
}

run() {  # prints a command, then runs it unless --dry-run
  show "$@"
  # shellcheck disable=SC2154  # the launcher sets dry_run
  [[ $dry_run == 1 ]] || "$@"
}
