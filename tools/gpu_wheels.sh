#!/usr/bin/env bash
# Download the wheels that tools/gpu_check.py needs on a GPU machine with no network (docs/gpu.md).
#
#   bash tools/gpu_wheels.sh [DIR]        (DIR defaults to .whl in the project folder)
#
# The machine is assumed to run CPython 3.12 on x86-64 Linux with a CUDA PyTorch, transformers, peft,
# accelerate, huggingface_hub, tokenizers, safetensors, sentencepiece, numpy, pyyaml, tqdm, matplotlib,
# httpx, h11, click, anyio and annotated-doc installed. We carry:
#   - transformers and peft at our pins: glmtune passes TrainingArguments that older transformers lack
#     (activation_checkpointing), and the machine's peft version is unknown. What transformers 5.23 needs
#     (huggingface_hub >= 1.31, tokenizers 0.23, regex, typer) is already there.
#   - the HTTP API's packages (fastapi, starlette, pydantic, uvicorn) and those of their needs that are not.
# bitsandbytes is left out: its wheel alone is over 40 MiB, so the QLoRA rows report it missing.
# All but pydantic-core are pure Python; pydantic-core is compiled, hence the platform flags.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${1:-$root/.whl}")
limit_mib=40
python=${PYTHON:-python3}

fail() { echo "gpu_wheels: $*" >&2; exit 2; }

# The versions pinned in constraints.txt (the ones the test suite runs).
wheels=()
for name in transformers peft fastapi starlette pydantic uvicorn; do
    version=$(grep -i -m1 "^$name==" "$root/constraints.txt" | cut -d= -f3) || true
    [ -n "$version" ] || fail "$name is not pinned in constraints.txt"
    wheels+=("$name==$version")
done
# Not pinned there: pydantic-core must be the exact version pydantic requires (checked below); the others
# are the versions `make setup` installs beside the pins. fastapi imports opentelemetry-api when it is
# imported, and pydantic needs a newer typing-extensions than the machine may have.
pydantic_core=2.50.4
wheels+=(pydantic-core==$pydantic_core annotated-types==0.8.0 typing-inspection==0.4.5
         opentelemetry-api==1.45.3 typing-extensions==4.16.0)

# Into a fresh folder first, so that DIR ends up without a stale version of any of them (two versions of
# one package make the install on the GPU machine fail).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${wheels[@]}"

required=$("$python" - "$tmp"/pydantic-[0-9]*.whl <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    print(next((line.split("==")[1] for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist: pydantic-core==")), ""))
EOF
)
[ "$required" = "$pydantic_core" ] || fail "pydantic requires pydantic-core==$required: set pydantic_core in $0"

mkdir -p "$dir"
for old in "$dir"/*.whl; do
    [ -e "$old" ] || continue
    [ -e "$tmp/$(basename "$old")" ] || fail "$dir already holds $(basename "$old"), which this script does not" \
        "download: remove it, or give another folder"
done
mv -f "$tmp"/*.whl "$dir"/

# Inside the checkout, keep the wheels out of commits with a local rule (.git/info/exclude).
case "$dir" in "$root"/*)
    if git -C "$root" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$root" check-ignore -q "$dir"; then
        exclude=$(git -C "$root" rev-parse --path-format=absolute --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")"
        echo "/${dir#"$root"/}/" >>"$exclude"
        echo "gpu_wheels: added /${dir#"$root"/}/ to .git/info/exclude"
    fi;;
esac

total=0
for f in "$dir"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "%7.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" -v n="$dir" 'BEGIN { printf "%7.2f MiB  in all, in %s\n", s / 1048576, n }'
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
    echo "gpu_wheels: the wheels take more than $limit_mib MiB" >&2
    exit 1
fi
