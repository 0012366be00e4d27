#!/usr/bin/env bash
# GPU checks for the shared-weight vLLM engine: pytest GPU tests + benchmarks/rl_step.py.
# Run from the repository root on a CUDA machine with vllm 0.26.0 importable:
#   bash benchmarks/gpu_check.sh quick   # GPU tests + a 2-layer Llama-3-8B-shaped smoke benchmark (eager)
#   bash benchmarks/gpu_check.sh full    # the Llama-3-8B benchmark (CUDA graphs) with the length search
#   bash benchmarks/gpu_check.sh all     # both
#   bash benchmarks/gpu_check.sh step    # GRPOTrainer.training_step before/after at 8 x 8 x 512, --quick (~4 min)
#   bash benchmarks/gpu_check.sh regimes # rl_step at 1 prompt x 8 x 4096 and 16 prompts x 8 x 512 (CUDA graphs)
#   bash benchmarks/gpu_check.sh example # python -m rlcore.run examples/gsm8k_grpo.py on a dummy Llama-3-8B dir
#   bash benchmarks/gpu_check.sh kernels # kernel GPU tests + train_step.py + kernel_ops.py (liger-kernel for its rows)
#   bash benchmarks/gpu_check.sh longest # longest trainable completion with / without activation offload
# Logs and JSON go to $OUT (default ./gpu_check_out).
set -uo pipefail
mode="${1:-quick}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# From a plain checkout (not pip-installed) rlcore.rewards / .envs / .kernels live in top-level folders that
# pyproject.toml maps into the package; link them in when that mapping is not installed.
if ! python3 -c "import rlcore.kernels, rlcore.rewards" 2>/dev/null; then
  for d in kernels rewards envs; do [ -e "rlcore/$d" ] || ln -s "../$d" "rlcore/$d"; done
fi
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$OUT/versions.txt"
status=0
if [ "$mode" = quick ] || [ "$mode" = all ]; then
  python3 -m pytest tests/test_vllm_engine.py -m "gpu or not gpu" -q -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest.log" || status=1
  python3 benchmarks/rl_step.py --quick --layers 2 --eager --prompts 2 --completion-len 64 \
    --search-lengths 1024,4096 --keep-gib 4 --out "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" || status=1
fi
if [ "$mode" = full ] || [ "$mode" = all ]; then
  python3 benchmarks/rl_step.py --out "$OUT/rl_step.json" 2>&1 | tee "$OUT/rl_step.log" || status=1
fi
if [ "$mode" = step ]; then
  python3 benchmarks/rl_step.py --quick --out "$OUT/rl_step.json" 2>&1 | tee "$OUT/rl_step.log" || status=1
fi
if [ "$mode" = regimes ]; then
  python3 benchmarks/rl_step.py --quick --prompts 1 --completion-len 4096 --micro-batch 1 --keep-gib 0 \
    --out "$OUT/rl_step_long.json" 2>&1 | tee "$OUT/rl_step_long.log" || status=1
  python3 benchmarks/rl_step.py --quick --prompts 16 --completion-len 512 --keep-gib 0 \
    --out "$OUT/rl_step_16.json" 2>&1 | tee "$OUT/rl_step_16.log" || status=1
fi
if [ "$mode" = example ]; then
  model_dir=$(python3 -c "from rlcore.tiny_model import write_llama3_8b_dummy_dir as w; print(w('/tmp/llama3-8b-dummy'))")
  python3 -m rlcore.run examples/gsm8k_grpo.py --set model="$model_dir" --set load_format=dummy \
    --set dataset=bundled --set max_steps=2 --set save_steps=2 --set output_dir="$OUT/example" --no-progress \
    2>&1 | tee "$OUT/example.log" || status=1
fi
if [ "$mode" = kernels ]; then
  python3 -m pytest tests/test_kernels_*.py tests/test_padding_free.py tests/test_activation_offloading.py -q \
    -p no:cacheprovider 2>&1 | tee "$OUT/kernels_pytest.log" || status=1
  python3 benchmarks/train_step.py --methods naive,ours,ours-offload,ours-keep,ours-ragged,ours-packed,naive-nockpt,liger \
    2>&1 \
    | tee "$OUT/train_step.log" || status=1
  python3 benchmarks/kernel_ops.py --json "$OUT/kernel_ops.json" 2>&1 | tee "$OUT/kernel_ops.log" || status=1
fi
if [ "$mode" = longest ]; then
  # one step at 100k+ tokens takes 45-180 s (attention is quadratic): start near the known limits
  python3 benchmarks/train_step.py --methods "" --longest ours --longest-start 122880 --longest-budget 150 2>&1 \
    | tee "$OUT/train_step_longest.log" || status=1
  python3 benchmarks/train_step.py --methods "" --longest ours-offload --longest-start 163840 --longest-budget 400 \
    2>&1 | tee -a "$OUT/train_step_longest.log" || status=1
fi
exit $status
