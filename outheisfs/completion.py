"""`outheisfs completion bash`: the bash completion script.

Agent names (for `ask` and `run`) are read from the mount's root `ctl`, message
ids (for `trace`) from the end of its `log`: the mount named by `--mount` on the
line, else `$OUTHEIS_MOUNT`, else `./mount`.
"""

BASH = r"""# bash completion for outheisfs: source <(outheisfs completion bash)
_outheisfs_mountpoint() {
  local i
  for ((i = 2; i < COMP_CWORD; i++)); do
    case ${COMP_WORDS[i]} in
      --mount) printf '%s\n' "${COMP_WORDS[i + 1]}"; return ;;
      --mount=*) printf '%s\n' "${COMP_WORDS[i]#--mount=}"; return ;;
    esac
  done
  printf '%s\n' "${OUTHEIS_MOUNT:-mount}"
}

_outheisfs_positional() {  # how many operands come before the word being completed
  local i n=0
  for ((i = 2; i < COMP_CWORD; i++)); do
    case ${COMP_WORDS[i]} in
      --) return 9 ;;
      --mount | --config | --state | --durability | --timeout | --until) ((i++)) ;;
      -*) ;;
      *) ((n++)) ;;
    esac
  done
  return $n
}

_outheisfs() {
  local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
  COMPREPLY=()
  if ((COMP_CWORD == 1)); then
    local all="mount umount reload run follow replay bench top trace ask completion --help"
    COMPREPLY=($(compgen -W "$all" -- "$cur"))
    return
  fi
  local cmd=${COMP_WORDS[1]} mp
  case $prev in
    --config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    --state | --mount) COMPREPLY=($(compgen -d -- "$cur")); return ;;
    --durability) COMPREPLY=($(compgen -W "process disk" -- "$cur")); return ;;
    --timeout | --until | --since | --unveil) return ;;
  esac
  local opts
  case $cmd in
    mount) opts="--config --state --foreground --durability" ;;
    run) opts="--mount --unveil --send" ;;
    follow) opts="--since --agent --type" ;;
    replay) opts="--state --until --full --json --cluster --config" ;;
    bench) opts="--quick --json" ;;
    trace) opts="--state --mount --json" ;;
    ask) opts="--mount --timeout --json" ;;
  esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$opts --help" -- "$cur"))
    return
  fi
  _outheisfs_positional
  local n=$?
  mp=$(_outheisfs_mountpoint)
  case $cmd in
    mount | umount | reload | top | follow) COMPREPLY=($(compgen -d -- "$cur")) ;;
    completion) ((n == 0)) && COMPREPLY=($(compgen -W "bash" -- "$cur")) ;;
    ask | run)
      if ((n == 0)); then
        COMPREPLY=($(compgen -W "$(cut -d' ' -f1 "$mp/ctl" 2>/dev/null)" -- "$cur"))
      elif ((n == 9)); then
        COMPREPLY=($(compgen -c -- "$cur"))
      fi
      ;;
    trace)
      if ((n == 0)); then
        local ids
        ids=$(tail -c 262144 "$mp/log" 2>/dev/null |
          grep -o '"type":"message","id":"[0-9A-Z]\{26\}"' | cut -d'"' -f8 | tail -n 200)
        COMPREPLY=($(compgen -W "$ids" -- "$cur"))
      fi
      ;;
  esac
}
complete -F _outheisfs outheisfs
"""
