#!/usr/bin/env bash
# Builds a code corpus from the open-source text a machine already holds, with the data tools'
# user-facing commands: a 32K byte-level BPE tokenizer (data_tools/train_tokenizer.py, trained
# on a sample of the training files) and the tokenized datasets (data_tools/preprocess.py), one
# document per text file, exact duplicates dropped, 1% of the files held out for validation.
#
# Sources: the installed Python packages and standard library of $PYTHON (site-/dist-packages),
# the C/C++ and CUDA headers (/usr/include, /usr/local/cuda/include) and /usr/share/doc; roots
# that do not exist are left out, and so is anything this project stages itself (the
# directories in $EXCLUDE_ROOTS, this repository, our own package).
#
#   bash bench/build_code_corpus.sh                 # -> /tmp/hm_corpus/{tokenizer,code_*}
#   CORPUS_DIR=/data/c WORKERS=16 bash bench/build_code_corpus.sh
#   ROOTS="/usr/include /usr/share/doc" bash bench/build_code_corpus.sh   # chosen roots only
#   TOKENIZER_FROM=saved/tokenizer bash bench/build_code_corpus.sh  # reuse a trained tokenizer
#
# Writes $CORPUS_DIR/tokenizer/, $CORPUS_DIR/code_train.{bin,idx}, code_valid.{bin,idx},
# code.manifest.json (per-source files, bytes, tokens; the file list's digest) and
# build_times.json. A finished build (manifest present, same roots) is kept: FORCE=1 rebuilds.
# TOKENIZER_FROM names a tokenizer folder trained by an earlier build, copied instead of trained
# again (training is deterministic, and the manifest records the tokenizer's sha256 either way).
# Run from the repository root; prints the datasets' prefixes for the recipes.
set -euo pipefail

PYTHON=${PYTHON:-python3}
CORPUS_DIR=${CORPUS_DIR:-/tmp/hm_corpus}
WORKERS=${WORKERS:-$(nproc)}
VOCAB=${VOCAB:-32768}
TOKENIZER_SAMPLE_BYTES=${TOKENIZER_SAMPLE_BYTES:-64000000}
VALID_FRACTION=${VALID_FRACTION:-0.01}
MAX_FILE_BYTES=${MAX_FILE_BYTES:-500000}
# Staged by this project on the GPU machines (the training stack); never corpus material.
EXCLUDE_ROOTS=${EXCLUDE_ROOTS:-/tmp/gpu-site}

INCLUDE=(
  '*.py' '*.pyi' '*.pyx' '*.pxd' '*.pxi'
  '*.h' '*.hh' '*.hpp' '*.hxx' '*.cuh' '*.inl' '*.tcc' '*.ipp' '*.def' '*.inc'
  '*.c' '*.cc' '*.cpp' '*.cxx' '*.cu'
  '*.md' '*.rst' '*.txt' '*.html' '*.toml' '*.cfg' '*.ini' '*.yaml' '*.yml' '*.sh' '*.cmake'
  'c++/*' 'README*' 'NEWS*' 'copyright' 'METADATA'
)
# Caches, generated file lists, minified bundles and this project's own package.
EXCLUDE=(
  '__pycache__' '*.pyc' 'RECORD' 'SOURCES.txt' '*.min.*'
  'hybrid_megatron*' '__editable__*' '.git'
)

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=true  # tokenizer training: use every core

discover_roots() {
  # Python's own trees first (site-packages of this interpreter, then the distribution's).
  "$PYTHON" - <<'EOF'
import site, sysconfig
paths = list(site.getsitepackages()) + [sysconfig.get_paths()["stdlib"]]
print("\n".join(paths))
EOF
  ls -d /usr/lib/python3*/dist-packages /usr/local/lib/python3*/dist-packages 2>/dev/null || true
  echo /usr/include
  echo /usr/local/cuda/include
  echo /usr/share/doc
}

if [[ -n "${ROOTS:-}" ]]; then
  read -r -a candidates <<<"$ROOTS"
else
  mapfile -t candidates < <(discover_roots)
fi
roots=()
declare -A seen=()
repo=$(realpath "$PWD")
for root in "${candidates[@]}"; do
  [[ -d "$root" ]] || continue
  real=$(realpath "$root")
  skip=""
  for staged in $EXCLUDE_ROOTS "$repo"; do
    staged=$(realpath -m "$staged")
    [[ "$real" == "$staged" || "$real" == "$staged"/* ]] && skip=1
  done
  [[ -n "$skip" || -n "${seen[$real]:-}" ]] && continue
  seen[$real]=1
  roots+=("$real")
done
if [[ ${#roots[@]} -eq 0 ]]; then
  echo "build_code_corpus: none of the source roots exists" >&2
  exit 1
fi

manifest="$CORPUS_DIR/code.manifest.json"
if [[ -z "${FORCE:-}" && -f "$manifest" && -f "$CORPUS_DIR/tokenizer/tokenizer.json" ]] \
  && "$PYTHON" -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["selection"]["roots"] != sys.argv[2:])' \
    "$manifest" "${roots[@]}"; then
  echo "build_code_corpus: $CORPUS_DIR already holds this corpus (FORCE=1 rebuilds)"
else
  mkdir -p "$CORPUS_DIR"
  selection=(
    --input-tree "${roots[@]}"
    --include "${INCLUDE[@]}"
    --exclude "${EXCLUDE[@]}"
    --max-file-bytes "$MAX_FILE_BYTES"
    --valid-fraction "$VALID_FRACTION"
  )
  t0=$(date +%s.%N)
  if [[ -n "${TOKENIZER_FROM:-}" ]]; then
    if [[ ! -f "$TOKENIZER_FROM/tokenizer.json" ]]; then
      echo "build_code_corpus: TOKENIZER_FROM=$TOKENIZER_FROM holds no tokenizer.json" >&2
      exit 1
    fi
    rm -rf "$CORPUS_DIR/tokenizer"
    cp -r "$TOKENIZER_FROM" "$CORPUS_DIR/tokenizer"
  else
    "$PYTHON" data_tools/train_tokenizer.py "${selection[@]}" --vocab-size "$VOCAB" \
      --max-bytes "$TOKENIZER_SAMPLE_BYTES" --output "$CORPUS_DIR/tokenizer" --overwrite
  fi
  t1=$(date +%s.%N)
  "$PYTHON" data_tools/preprocess.py "${selection[@]}" --tokenizer "$CORPUS_DIR/tokenizer" \
    --output-prefix "$CORPUS_DIR/code" --workers "$WORKERS" --append-eod --no-progress
  t2=$(date +%s.%N)
  "$PYTHON" - "$CORPUS_DIR/build_times.json" "$t0" "$t1" "$t2" "$WORKERS" <<'EOF'
import json, sys
path, t0, t1, t2, workers = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5])
times = {"tokenizer_s": round(t1 - t0, 1), "preprocess_s": round(t2 - t1, 1),
         "total_s": round(t2 - t0, 1), "workers": workers}
json.dump(times, open(path, "w"), indent=2)
print("build_code_corpus:", times)
EOF
fi
"$PYTHON" - "$manifest" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"corpus {m['files_digest'][:16]}: train {m['tokens']['train']:,} tokens "
      f"({m['documents']['train']:,} files), valid {m['tokens'].get('valid', 0):,} tokens; "
      f"tokenizer sha256 {m['tokenizer']['sha256'][:16]}")
print("data.blend:", m["outputs"]["train"], " data.valid_blend:", m["outputs"].get("valid"))
EOF
