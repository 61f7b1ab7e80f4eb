#!/usr/bin/env bash
# Regenerates every result committed in docs/ and benchmarks/results/ from the bundled model
# (about 1.5–2 hours on 2 CPU cores). Each step's wall time goes to docs/timings.txt.
#   bash scripts/docs_results.sh [step …]     steps: evaluate study study-nag sweep methods methods-scale1 methods-distilled sampler benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
NP=.venv/bin/negprompt
PY=.venv/bin/python
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(evaluate study study-nag sweep methods methods-scale1 methods-distilled sampler benchmarks)

timed() {  # timed NAME COMMAND…
    local name=$1 start end
    shift
    start=$(date +%s)
    "$@"
    end=$(date +%s)
    echo "$name: $((end - start)) s ($(nproc --all) cores, torch threads ${OMP_NUM_THREADS:-all}, $(date -u +%F))" | tee -a docs/timings.txt
}

for step in "${steps[@]}"; do
    case $step in
    evaluate) timed evaluate $NP evaluate --out docs/evaluation -q ;;
    study)
        rm -rf docs/study
        timed study $NP study shapes --out docs/study -q
        $NP report docs/study
        ;;
    study-nag)  # the same study with the negative read inside attention (rule nag)
        rm -rf docs/study-nag
        timed study-nag $NP study shapes-nag --out docs/study-nag -q
        $NP report docs/study-nag
        ;;
    sweep)
        timed edit-sweep $NP edit-sweep --seed 0-99 --start-every 4 --out docs/edit-sweep -q \
            --pair "a red circle->a hat" --pair "a blue square->a hat"
        ;;
    methods) timed bench-methods $NP bench-methods --images 200 --negative "a hat" --out docs/methods -q ;;
    methods-scale1)  # at s = 1 only the rules acting inside attention can use the negative
        timed bench-methods-scale1 $NP bench-methods --images 200 --negative "a hat" --scale 1 \
            --out docs/methods/scale-1 -q
        ;;
    methods-distilled)  # the guidance-distilled model: one pass a step, no ε_∅ for a plain negative to replace
        timed bench-methods-distilled $NP bench-methods --model shapes-distilled --images 200 --negative "a hat" \
            --scale 1 --out docs/methods/distilled -q
        ;;
    sampler) timed bench-sampler $PY benchmarks/bench_sampler.py ;;
    benchmarks)
        timed bench-attention $PY benchmarks/bench_attention.py
        timed bench-study $PY benchmarks/bench_study.py
        timed bench-edit $PY benchmarks/bench_edit.py
        timed bench-attention-negatives $PY benchmarks/bench_attention_negatives.py
        timed bench-mmdit $PY benchmarks/bench_mmdit.py
        ;;
    *) echo "unknown step $step (evaluate study study-nag sweep methods methods-scale1 methods-distilled sampler benchmarks)" >&2 && exit 2 ;;
    esac
done
