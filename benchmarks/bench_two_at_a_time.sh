#!/bin/bash
# fp32 against bf16 as `make demo` runs stages: two 1-thread processes at once on a 2-core
# machine (a bf16 gain measured one process at a time need not survive its neighbour).
#
#   bash benchmarks/bench_two_at_a_time.sh KIND WORK [ROUNDS]
#
# KIND: teacher (the default preset's fp32 teacher: resnet8, fashion-mnist[0-4], holdout 5000,
# 3 epochs), qat or divqat (1 epoch from WORK's fp32 teachers of the first round: run teacher
# first), or attack (KnockoffNets, holdout, 1,000 and 5,000 queries, 5 epochs, >= 150 steps,
# against WORK's fp32 QAT victims of the first round: run qat first). Each round runs the kind
# twice side by side (seeds 0 and 1) in fp32, then twice in bf16 (the other order in even
# rounds), and prints wall and user CPU seconds per process (GNU time) and each run's last
# line (its accuracy). Everything under WORK; nothing else is written.
set -eu
KIND=$1; WORK=$2; ROUNDS=${3:-2}
DIVQAT=${DIVQAT:-$(dirname "$0")/../.venv/bin/divqat}
mkdir -p "$WORK"
run() {  # precision seed out
  local prec=$1 seed=$2 out=$3 args
  case $KIND in
    teacher) args=(train --mode fp32 --epochs 3 --lr 0.1) ;;
    qat) args=(train --mode qat --teacher "$WORK/teacher-fp32-s$seed-r1" --epochs 1 --lr 0.01) ;;
    divqat) args=(train --mode divqat --teacher "$WORK/teacher-fp32-s$seed-r1" --alpha 2 --epochs 1 --lr 0.01) ;;
    attack) args=(attack --victim "$WORK/qat-fp32-s$seed-r1" --attack knockoff --transfer holdout
                  --budget 1000 5000 --epochs 5 --min-steps 150 --eval-precision "$prec") ;;
    *) echo "KIND: teacher, qat, divqat or attack" >&2; exit 2 ;;
  esac
  [ "$KIND" = attack ] || args+=(--dataset "fashion-mnist[0-4]" --holdout 5000 --arch resnet8)
  OMP_NUM_THREADS=1 /usr/bin/time -f "$KIND $prec seed $seed: wall %e s, user %U s" "$DIVQAT" "${args[@]}" \
    --threads 1 --no-progress --precision "$prec" --seed "$seed" --out "$out" > "$out.log" 2>&1
  tail -1 "$out.log"
  grep -h "accuracy" "$out.log" | tail -2
}
for r in $(seq "$ROUNDS"); do
  order="fp32 bf16"; [ $((r % 2)) = 0 ] && order="bf16 fp32"
  for prec in $order; do
    run "$prec" 0 "$WORK/$KIND-$prec-s0-r$r" & a=$!
    run "$prec" 1 "$WORK/$KIND-$prec-s1-r$r" & b=$!
    wait $a $b
  done
done
