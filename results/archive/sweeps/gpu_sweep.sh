#!/bin/bash
# A defense sweep on one GPU machine: N workers of bench/defense_sweep.py at once (one job each when N = jobs),
# each cut off after T seconds, then the report. Data: `python bench/gpu_data.py --out .gpudata` here, then carry
# .gpudata. Writes to $OUT: the report (md/json), the workers' logs, the evaluations, and the trained models (three
# tars, to evaluate here whatever was cut off during evaluation).
#   N=15 T=470 GRID=bench/sweeps/equal_epochs4.yaml SEEDS=0,1,2 bash bench/gpu_sweep.sh
BUDGET=${BUDGET:-cpu}; GRID=${GRID:?set GRID}; SEEDS=${SEEDS:-0,1,2}; N=${N:-12}; T=${T:-420}
DEVICE=${DEVICE:-cuda}; OUT=${OUT:-/tmp/out}; PY=${PY:-python3}; NAME=$(basename "$GRID" .yaml)
mkdir -p "$OUT" runs
t0=$(date +%s)
nvidia-smi -L 2>/dev/null; nproc
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
DATA=${DATA---data-dir .gpudata/cifar10 --init .gpudata/weights/resnet20-12fca82f.th}  # DATA= (empty) for the smoke budget
common="--budget $BUDGET --grid $GRID --seeds $SEEDS $DATA --runs-dir runs/gpu_$NAME --device $DEVICE --threads 1"
for i in $(seq 0 $((N-1))); do
  timeout "$T" $PY bench/defense_sweep.py $common --no-cost --shard "$i/$N" --out "runs/gpu_${NAME}_shard$i" > "runs/gpu_${NAME}_log$i.txt" 2>&1 &
done
wait
echo "workers done after $(( $(date +%s) - t0 )) s"
$PY bench/defense_sweep.py $common --no-cost --report-only --out "$OUT/gpu_$NAME" > /dev/null 2>&1
cat "$OUT/gpu_$NAME.md"
for i in $(seq 0 $((N-1))); do echo "=== worker $i"; grep -v "^  " "runs/gpu_${NAME}_log$i.txt" | tail -4; done > "$OUT/worker_tails.txt"
cat runs/gpu_${NAME}_log*.txt > "$OUT/worker_logs.txt"
(cd runs && tar czf "$OUT/evals.tgz" $(ls gpu_$NAME/*/*/eval.json gpu_$NAME/*/*/metrics.json gpu_$NAME/*/*/config.json 2>/dev/null))
# trained models, and the resume checkpoint of a training that was cut off, in three tars (16 MiB a file)
ckpts=$(cd runs && for d in gpu_$NAME/*/*/; do [ -f "$d/model.pt" ] && echo "$d"model.pt || { [ -f "$d/last.pt" ] && echo "$d"last.pt; }; done)
n=$(echo $ckpts | wc -w); k=$(( (n + 2) / 3 ))
for t in 1 2 3; do
  part=$(echo $ckpts | tr ' ' '\n' | tail -n +$(( (t-1)*k + 1 )) | head -n $k)
  [ -n "$part" ] && (cd runs && tar cf "$OUT/models$t.tar" $part)
done
grep -i "error\|failed\|Traceback" "$OUT/worker_tails.txt" | head -20
echo "total $(( $(date +%s) - t0 )) s"
