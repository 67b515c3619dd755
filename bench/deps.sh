#!/usr/bin/env bash
# Installs what `make analysis` / `make bench` need from Debian's packages, only when missing.
#   bench/deps.sh fonts     a TrueType font for the charts (fonts-dejavu-core)
#   bench/deps.sh proxies   nginx, haproxy and wrk
#   bench/deps.sh chromium  headless Chromium and a font for the operator page's browser test
#                           (`make test` calls this; tests/browser.rs fails loudly without it)
#   bench/deps.sh curl      curl, the HTTP/1.1 and HTTP/2-over-TLS client of tests/tls.rs
#   bench/deps.sh busybox   busybox-static, the static busybox of `make example-httpd` (the
#                           FROM scratch httpd image of docs/deployment.md and
#                           tests/docker_apps.rs)
#   bench/deps.sh h2load    h2load (nghttp2-client), the HTTP/2 and gRPC load of `make bench-h2`
#   bench/deps.sh valgrind  valgrind (callgrind, callgrind_control, callgrind_annotate, DHAT) for
#                           `make bench-instr` and `make bench-idle-profile`
#   bench/deps.sh strace    strace, the system-call counts of `make bench-tunnels-rest`
#   bench/deps.sh python    the Python clients of the tunnel and gRPC tests (websockets, grpcio)
#                           in a virtualenv at target/pyclients, from tests/support/requirements.txt
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO=""; fi
fi

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# The Python clients live in a virtualenv of this checkout (PyPI through pip; Debian's Python
# refuses system-wide pip installs). Rebuilt only when the requirements change.
python_clients() {
    local root venv stamp
    root="$(cd "$(dirname "$0")/.." && pwd)"
    venv="$root/target/pyclients"
    stamp="$venv/requirements.txt"
    if [ -x "$venv/bin/python3" ] && cmp -s "$root/tests/support/requirements.txt" "$stamp"; then
        return 0
    fi
    echo "installing the Python test clients into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/support/requirements.txt"
    cp "$root/tests/support/requirements.txt" "$stamp"
}

missing=()
for what in "$@"; do
    case "$what" in
        fonts)
            if [ -z "${RINGGATE_FONT:-}" ] && [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
                missing+=(fonts-dejavu-core)
            fi ;;
        proxies)
            have nginx || missing+=(nginx)
            have haproxy || missing+=(haproxy)
            have wrk || missing+=(wrk) ;;
        chromium)
            if [ -z "${RINGGATE_CHROMIUM:-}" ] && ! have chromium && ! have chromium-browser; then
                missing+=(chromium)
            fi
            [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core) ;;
        curl)
            have curl || missing+=(curl) ;;
        busybox)
            # The static build: Debian's plain `busybox` is dynamically linked and cannot
            # run in an empty image.
            if command -v dpkg >/dev/null 2>&1; then
                dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
            else
                have busybox || missing+=(busybox-static)
            fi ;;
        h2load)
            have h2load || missing+=(nghttp2-client) ;;
        valgrind)
            have valgrind || missing+=(valgrind) ;;
        strace)
            have strace || missing+=(strace) ;;
        python)
            python_clients ;;
        *) echo "deps.sh: unknown group $what" >&2; exit 2 ;;
    esac
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: missing ${missing[*]} and no apt-get to install them" >&2
    exit 1
fi
echo "installing ${missing[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
