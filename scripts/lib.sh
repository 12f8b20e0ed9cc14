# Shared shell helpers for scripts/test (and other scripts of this repo).
# Source it from bash:  . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It only defines functions and a few variables; it runs nothing by itself.

# Repository root (the directory above scripts/).
ASYNC_SQS_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Python dependencies of every test venv (the trytond/proteus pins are added
# per series).  Changing this list makes the next run re-install them.
ASYNC_SQS_TEST_REQUIREMENTS=(
    boto3
    wrapt
    'moto[server]'
    pytest
    hypothesis
    psycopg2-binary
    # trytond >= 8.0's postgresql backend imports psycopg (3), not psycopg2.
    'psycopg[binary,pool]>=3.2'
    # The lint and the documentation build (run_lint, build_docs).
    flake8
    isort
    sphinx
    sphinx-book-theme
    sphinx-copybutton
)

PIP_FLAGS=(-q --disable-pip-version-check --no-input)

log() { printf '%s\n' "$*"; }
note() { printf '[scripts/test] %s\n' "$*"; }
warn() { printf '[scripts/test] WARNING: %s\n' "$*" >&2; }
die() { printf '[scripts/test] ERROR: %s\n' "$*" >&2; exit 1; }

# Milliseconds since the epoch.
now_ms() { date +%s%3N; }

# Seconds (one decimal) elapsed since the given now_ms value.
elapsed_since() {
    local start=$1 end
    end=$(now_ms)
    awk -v d=$((end - start)) 'BEGIN { printf "%.1f", d / 1000 }'
}

# A free TCP port on 127.0.0.1 (the kernel picks it).
free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# pip, quieter: drops the harmless warnings about local mirror directories
# that have no entry for a package.  Keeps pip's exit status.
pip_quiet() {
    local py=$1
    shift
    "$py" -m pip "${PIP_FLAGS[@]}" "$@" </dev/null 2> >(grep -v -E \
        "is ignored: it is neither a file nor a directory" >&2)
}

# The next minor series after X.Y: 8.0 -> 8.1.
next_minor() {
    local major=${1%%.*} minor=${1#*.}
    printf '%s.%s\n' "$major" $((minor + 1))
}

# Prints the trytond version installed in the venv whose python is $1, or
# nothing.
venv_trytond_version() {
    "$1" -c 'import trytond; print(trytond.__version__)' 2>/dev/null
}

# ensure_venv SERIES: creates or reuses .venv/trytond-SERIES with trytond,
# proteus and the test requirements.  Does not install the project.
ensure_venv() {
    local series=$1 venv="$ASYNC_SQS_REPO/.venv/trytond-$1"
    local py="$venv/bin/python" upper version stamp want
    upper=$(next_minor "$series")
    local reqs=("trytond>=$series,<$upper" "proteus>=$series,<$upper"
        "${ASYNC_SQS_TEST_REQUIREMENTS[@]}")
    want=$(printf '%s\n' "${reqs[@]}")
    stamp="$venv/.async_sqs_requirements"

    if [[ -x $py ]]; then
        version=$(venv_trytond_version "$py")
        if [[ -z $version ]] || ! "$py" -m pip --version >/dev/null 2>&1; then
            note "venv $venv is broken or has no trytond: re-creating it"
            rm -rf "$venv"
        elif [[ $version != "$series".* ]]; then
            note "venv $venv has trytond $version, not $series: re-creating it"
            rm -rf "$venv"
        elif [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
            note "reusing venv $venv (trytond $version)"
            return 0
        else
            note "venv $venv: requirements changed, updating it"
        fi
    fi
    if [[ ! -x $py ]]; then
        mkdir -p "$ASYNC_SQS_REPO/.venv"
        "${ASYNC_SQS_PYTHON:-python3}" -m venv "$venv" \
            || die "could not create venv $venv"
    fi
    rm -f "$stamp"
    note "installing trytond $series and test requirements into $venv"
    pip_quiet "$py" install "${reqs[@]}" \
        || die "pip install of the test requirements into $venv failed"
    version=$(venv_trytond_version "$py")
    [[ $version == "$series".* ]] \
        || die "venv $venv: expected trytond $series.*, got '${version}'"
    printf '%s\n' "$want" >"$stamp"
}

# install_project SERIES: (re)installs the project itself, non-editable, into
# the venv of SERIES.  Skipped with a notice while there is no setup.py or
# pyproject.toml yet.
install_project() {
    local venv="$ASYNC_SQS_REPO/.venv/trytond-$1" out
    local py="$venv/bin/python"
    if [[ ! -f $ASYNC_SQS_REPO/setup.py && ! -f $ASYNC_SQS_REPO/pyproject.toml ]]; then
        note "no setup.py/pyproject.toml yet: project NOT installed into $venv"
        return 0
    fi
    # setuptools builds in the source tree (build/lib); stale files left
    # there by an earlier build would end up in the new wheel.
    rm -rf "$ASYNC_SQS_REPO"/build/lib "$ASYNC_SQS_REPO"/build/bdist.*
    (cd "$ASYNC_SQS_REPO" && pip_quiet "$py" install --no-deps \
        --force-reinstall .) || die "pip install of the project into $venv failed"
    # --no-deps skips the project's own install_requires: install any that
    # the test requirements did not already bring.
    if ! out=$("$py" -m pip check 2>&1); then
        note "pip check in $venv: $out"
        note "installing the project's missing dependencies"
        (cd "$ASYNC_SQS_REPO" && pip_quiet "$py" install .) \
            || die "pip install of the project's dependencies into $venv failed"
    fi
}

# link_test_module SERIES: symlinks tests/async_sqs_test into the venv's
# trytond/modules so that trytond finds the test-only module.
link_test_module() {
    local py="$ASYNC_SQS_REPO/.venv/trytond-$1/bin/python" moddir target
    local src="$ASYNC_SQS_REPO/tests/async_sqs_test"
    moddir=$("$py" -c 'import trytond.modules, os; print(os.path.dirname(trytond.modules.__file__))') \
        || die "cannot locate trytond/modules in .venv/trytond-$1"
    target="$moddir/async_sqs_test"
    if [[ ! -d $src ]]; then
        [[ -L $target ]] && rm -f "$target"
        note "tests/async_sqs_test does not exist yet: test module not linked"
        return 0
    fi
    if [[ -e $target && ! -L $target ]]; then
        warn "$target exists and is not a symlink: left as it is"
        return 0
    fi
    ln -sfn "$src" "$target"
}

# --- throwaway PostgreSQL cluster -----------------------------------------
# Set by pg_start; read by pg_stop.
PG_TMP=
PG_PORT=
PG_BIN=
PG_PID=

pg_bin_dir() {
    local initdb
    initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
    # Elsewhere than Debian/Ubuntu: initdb on the PATH.
    [[ -n $initdb ]] || initdb=$(command -v initdb 2>/dev/null)
    [[ -n $initdb ]] && dirname "$initdb"
}

# Installs Debian's postgresql if no server binaries are there (root only).
pg_ensure_installed() {
    [[ -n $(pg_bin_dir) ]] && return 0
    [[ $(id -u) == 0 ]] || die "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); install the 'postgresql' package or run with --backend sqlite"
    note "installing PostgreSQL (apt-get)"
    local made_policy=
    # Keep the package from starting its own default cluster.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; } \
        </dev/null >/tmp/async_sqs_apt.log 2>&1 || rc=$?
    [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
    if [[ $rc != 0 ]]; then
        tail -n 30 /tmp/async_sqs_apt.log >&2
        die "apt-get install postgresql failed"
    fi
    [[ -n $(pg_bin_dir) ]] || die "postgresql installed but no initdb found"
}

# Installs Debian's apache2-utils if ab is not on the PATH (root only): the
# load of bench/run.py --http.
ab_ensure_installed() {
    command -v ab >/dev/null 2>&1 && return 0
    [[ $(id -u) == 0 ]] || die "ab not found: install the 'apache2-utils' package"
    note "installing ab (apt-get install apache2-utils)"
    local made_policy=
    # Keep the package from starting a service of its own.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0 apt=(apt-get -q -o DPkg::Lock::Timeout=300)
    { DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends apache2-utils ||
        { DEBIAN_FRONTEND=noninteractive "${apt[@]}" update &&
            DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends apache2-utils; }; } \
        </dev/null >/tmp/async_sqs_apt_ab.log 2>&1 || rc=$?
    [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
    if [[ $rc != 0 ]]; then
        tail -n 30 /tmp/async_sqs_apt_ab.log >&2
        die "apt-get install apache2-utils failed"
    fi
    command -v ab >/dev/null 2>&1 || die "apache2-utils installed but no ab found"
}

# Runs a PostgreSQL binary as the cluster owner (postgres when we are root),
# from the cluster's temp dir (the postgres user may not read our cwd).
pg_as_owner() {
    if [[ $(id -u) == 0 ]]; then
        (cd "$PG_TMP" && runuser -u postgres -- "$@")
    else
        (cd "$PG_TMP" && "$@")
    fi
}

# Starts the cluster; sets PG_TMP, PG_PORT, PG_BIN, PG_PID.
pg_start() {
    pg_ensure_installed
    PG_BIN=$(pg_bin_dir)
    if [[ $(id -u) == 0 ]]; then
        # Under /tmp: the postgres user must be able to reach it.
        PG_TMP=$(mktemp -d /tmp/async_sqs_pg.XXXXXX) || die "mktemp failed"
        chown postgres: "$PG_TMP"
    else
        PG_TMP=$(mktemp -d "${TMPDIR:-/tmp}/async_sqs_pg.XXXXXX") || die "mktemp failed"
    fi
    pg_as_owner "$PG_BIN/initdb" -D "$PG_TMP/data" -A trust -U postgres \
        -E UTF8 --locale=C.UTF-8 --no-sync >"$PG_TMP/initdb.log" 2>&1 || {
        cat "$PG_TMP/initdb.log" >&2
        die "initdb failed"
    }
    local try
    for try in 1 2 3; do
        PG_PORT=$(free_port)
        if pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" \
            -o "-p $PG_PORT -k $PG_TMP -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            -w -t 60 start >"$PG_TMP/pg_ctl.log" 2>&1; then
            PG_PID=$(head -n 1 "$PG_TMP/data/postmaster.pid" 2>/dev/null)
            return 0
        fi
        # The port may have been taken in between: try another one.
        warn "pg_ctl start on port $PG_PORT failed (try $try)"
        tail -n 5 "$PG_TMP/server.log" >&2 2>/dev/null
        PG_PID=$(head -n 1 "$PG_TMP/data/postmaster.pid" 2>/dev/null)
        pg_stop_server
    done
    cat "$PG_TMP/pg_ctl.log" "$PG_TMP/server.log" >&2 2>/dev/null
    die "could not start PostgreSQL"
}

# Stops the server (not the temp dir).  Fast shutdown, then kill.
pg_stop_server() {
    [[ -n $PG_TMP && -d $PG_TMP/data ]] || return 0
    if [[ -z $PG_PID && -f $PG_TMP/data/postmaster.pid ]]; then
        PG_PID=$(head -n 1 "$PG_TMP/data/postmaster.pid" 2>/dev/null)
    fi
    if [[ -f $PG_TMP/data/postmaster.pid ]]; then
        pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m fast -w -t 30 stop \
            >/dev/null 2>&1 || true
    fi
    if [[ -n $PG_PID ]] && kill -0 "$PG_PID" 2>/dev/null; then
        # The postmaster leads its own session/process group (pg_ctl
        # setsid()s it): kill the whole group.
        kill -KILL -- "-$PG_PID" 2>/dev/null || kill -KILL "$PG_PID" 2>/dev/null
    fi
    PG_PID=
}

pg_stop() {
    [[ -n $PG_TMP ]] || return 0
    pg_stop_server
    rm -rf "$PG_TMP"
    PG_TMP=
}

# Kills every process whose environment holds NAME=VALUE (children of the
# test runs, e.g. worker processes or moto servers that outlived pytest).
kill_marked_processes() {
    local pids=() pid
    read -r -a pids <<<"$(python3 - "$1=$2" "$$" <<'EOF'
import os, sys
marker = sys.argv[1].encode()
skip = {os.getpid(), os.getppid(), int(sys.argv[2])}
found = []
for name in os.listdir('/proc'):
    if not name.isdigit() or int(name) in skip:
        continue
    try:
        with open('/proc/%s/environ' % name, 'rb') as f:
            env = f.read().split(b'\0')
    except OSError:
        continue
    if marker in env:
        found.append(name)
print(' '.join(found))
EOF
)"
    ((${#pids[@]})) || return 0
    note "killing leftover test processes: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null
    local i alive
    for i in 1 2 3 4 5 6 7 8 9 10; do
        alive=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        ((${#alive[@]})) || return 0
        sleep 0.2
    done
    kill -KILL "${alive[@]}" 2>/dev/null
    return 0
}

# --- lint and documentation ------------------------------------------------
# What the lint checks (flake8 and isort read their settings from setup.cfg).
ASYNC_SQS_LINT_PATHS=(async_sqs tests)

# run_lint SERIES: flake8 and isort's check on ASYNC_SQS_LINT_PATHS with the
# tools of the venv of SERIES; prints what is wrong and returns non-zero if
# anything is.
run_lint() {
    local bin="$ASYNC_SQS_REPO/.venv/trytond-$1/bin" rc=0
    (cd "$ASYNC_SQS_REPO" && "$bin/flake8" "${ASYNC_SQS_LINT_PATHS[@]}") || rc=1
    (cd "$ASYNC_SQS_REPO" && "$bin/isort" --check-only --diff \
        "${ASYNC_SQS_LINT_PATHS[@]}") || rc=1
    return "$rc"
}

# build_docs SERIES OUTDIR: builds doc/ as HTML into OUTDIR with the Sphinx
# of the venv of SERIES, warnings as errors (all of them reported).
build_docs() {
    local bin="$ASYNC_SQS_REPO/.venv/trytond-$1/bin"
    (cd "$ASYNC_SQS_REPO" && "$bin/sphinx-build" -q -W --keep-going -b html \
        doc "$2") </dev/null
}
