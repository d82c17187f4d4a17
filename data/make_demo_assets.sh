#!/usr/bin/env bash
# Regenerates the bundled demo assets from data/austen.jsonl (run from anywhere):
#   data/tokenizer/                       byte-level BPE, vocab 4096
#   data/austen_4k_text_document.{bin,idx,stats.json}   the corpus tokenized with it (+ EOD)
# data/austen.jsonl itself comes from the Debian package r-cran-janeaustenr: see data/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" data_tools/train_tokenizer.py --input data/austen.jsonl --vocab-size 4096 --output data/tokenizer
"$PY" data_tools/preprocess.py --input data/austen.jsonl --tokenizer data/tokenizer \
    --output-prefix data/austen_4k_text_document --workers 2 --append-eod --no-progress
