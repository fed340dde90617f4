#!/usr/bin/env bash
# The GPU half of issue 6's benchmark (bench/vs_nuts.py's CUDA rows) and the CUDA tests, in as
# few calls of a lent GPU machine as they fit (each call: 10 min at most; a session: 30 min).
#
# Here, once, before the calls (needs pip's network and the CPU runs' cache):
#
#     bash bench/device_kit.sh pack
#
#   puts the wheels the machine's image lacks (it has torch, numpy, scipy, pandas, matplotlib,
#   xarray, h5py, tqdm, opt_einsum, pytest, jax and numpyro) into .whl/, and the cached priors
#   and references the stages load into .bench_cache/ (from $CACHE, default
#   /tmp/pyro_diffusion_bench_cache; the CPU runs of bench/README.md made them). Both folders
#   are git-ignored; together with the working tree they stay under the 64 MiB a call carries.
#
# There, in each call (carry: [".whl", ".bench_cache"]):
#
#     bash bench/device_kit.sh STAGE ...      # e.g. tests fixed256, then hyper256 fixed1024
#
#   tests      tests/test_cuda.py; bench/host_syncs.py and bench/sampling.py on the GPU
#   fixed256   vs_nuts d = 256, fixed hyperparameters, Poisson and Binomial: DiffusionLangevin
#              (learned and exact prior) on the CPU and the GPU, Pyro and NumPyro NUTS on the
#              CPU (about 4 min)
#   hyper256   vs_nuts d = 256 with hyperpriors (the learned mixture-skip prior), Langevin on the
#              CPU and the GPU; NUTS rows skipped (hours on a CPU; run 20 has NumPyro's cost)
#   fixed1024  vs_nuts d = 1024, fixed hyperparameters, Binomial, with NUTS (about 7 min)
#   guided     vs_nuts d = 256, both forms: the guided DiffusionPosterior on the GPU only
#
# Tables and logs go to $OUT (the device tool's folder; default ./device_out). KIT_DEVICES
# (default "cpu cuda") and KIT_EXTRA (more vs_nuts options, e.g. --skip-nuts) allow a dry run
# on a machine without a GPU: KIT_DEVICES=cpu KIT_EXTRA=--skip-nuts bash bench/device_kit.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
CACHE=${CACHE:-/tmp/pyro_diffusion_bench_cache}
DEVICES=${KIT_DEVICES:-cpu cuda}
EXTRA=${KIT_EXTRA:-}
PY=${PYTHON:-python3}

WHEELS="pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.11.0 h5netcdf==1.8.2
        platformdirs==4.14.7"
CACHED="prior_256_fixed_n20000_s2000_seed0_skip_w128 prior_256_hyper_n20000_s2000_seed0_mix8_w128
        prior_1024_fixed_n20000_s2000_seed0_skip_w128"
REFS="ref_256_fixed_poisson_seed0_4x500+500 ref_256_fixed_binomial_seed0_4x500+500
      ref_256_hyper_poisson_seed0_2x500+1000_numpyro ref_256_hyper_binomial_seed0_2x500+1000_numpyro
      ref_1024_fixed_binomial_seed0_2x500+500"

pack() {
    rm -rf .whl .bench_cache
    mkdir -p .whl .bench_cache
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    for name in $CACHED; do
        cp "$CACHE/$name.pt" "$CACHE/$name.json" .bench_cache/
    done
    for name in $REFS; do
        cp "$CACHE/$name.pt" .bench_cache/
    done
    { git rev-parse --short HEAD; git status --short; } > .bench_cache/REVISION
    du -sh .whl .bench_cache
    echo "carry: [\".whl\", \".bench_cache\"]"
}

setup() {
    mkdir -p "$OUT"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --ignore-requires-python \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    {
        date -u
        echo "packed at git $(cat .bench_cache/REVISION 2>/dev/null || echo unknown)"
        nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
        "$PY" -c "import torch, pyro; print('torch', torch.__version__, 'pyro', \
pyro.__version__, 'cuda', torch.cuda.is_available())"
        nproc
    } | tee "$OUT/machine.txt"
}

vs_nuts() {  # vs_nuts NAME ARGS...: one vs_nuts.py run, its table in $OUT/NAME.md
    local name=$1
    shift
    # shellcheck disable=SC2086
    "$PY" bench/vs_nuts.py --cache .bench_cache --data-from-cache --width 128 --threads 1 \
        --check-samples 0 "$@" $EXTRA --out "$OUT/$name.md" 2>&1 | tee "$OUT/$name.log"
}

stage() {
    local start=$SECONDS
    echo "=== stage $1"
    case $1 in
        tests)
            "$PY" -m pytest -q -p no:cacheprovider -ra tests/test_cuda.py 2>&1 \
                | tee "$OUT/test_cuda.log"
            if [[ $DEVICES == *cuda* ]]; then
                "$PY" bench/host_syncs.py --device cuda --validation on off --threads 1 \
                    --out "$OUT/host_syncs_cuda.md" 2>&1 | tee "$OUT/host_syncs_cuda.log"
                # The H100 table in bench/README.md was taken with one host read per step:
                # the same command again shows what removing it is worth.
                "$PY" bench/sampling.py --devices cuda --dims 2 8 \
                    --out "$OUT/sampling_cuda.md" 2>&1 | tee "$OUT/sampling_cuda.log"
            fi ;;
        fixed256)
            # shellcheck disable=SC2086
            vs_nuts vs_nuts_fixed256 --dims 256 --forms fixed --skip-guided --exact-prior \
                --langevin-steps 20 10 --ref-warmup 500 --ref-draws 500 --devices $DEVICES ;;
        hyper256)
            # shellcheck disable=SC2086
            vs_nuts vs_nuts_hyper256 --dims 256 --forms hyper --skip-guided --skip-nuts \
                --skip-components 8 --ref-backend numpyro --ref-chains 2 --ref-warmup 500 \
                --ref-draws 1000 --devices $DEVICES ;;
        fixed1024)
            # shellcheck disable=SC2086
            vs_nuts vs_nuts_fixed1024 --dims 1024 --forms fixed --likelihoods binomial \
                --skip-guided --langevin-steps 20 10 --ref-chains 2 --ref-warmup 500 \
                --ref-draws 500 --devices $DEVICES ;;
        guided)
            # shellcheck disable=SC2086
            vs_nuts vs_nuts_guided256_fixed --dims 256 --forms fixed --skip-nuts \
                --langevin-steps --ref-warmup 500 --ref-draws 500 --devices ${DEVICES##* }
            # shellcheck disable=SC2086
            vs_nuts vs_nuts_guided256_hyper --dims 256 --forms hyper --skip-nuts \
                --skip-components 8 --ref-backend numpyro --ref-chains 2 --ref-warmup 500 \
                --ref-draws 1000 --langevin-steps --devices ${DEVICES##* } ;;
        *)
            echo "unknown stage $1 (pack, tests, fixed256, hyper256, fixed1024, guided)" >&2
            exit 2 ;;
    esac
    echo "=== stage $1: $((SECONDS - start)) s"
}

if [[ $# -eq 0 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
fi
if [[ $1 == pack ]]; then
    pack
    exit 0
fi
setup
for s in "$@"; do
    stage "$s"
done
