export MOEBENCH_TRITON_CACHE=/tmp/tc PYTHONPATH=$PWD:/tmp/site; mkdir -p /tmp/tc; cp .tune-cache/*.json /tmp/tc/
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site ./plugins/moebench-peers 2>&1 | tail -2
P=scripts/host_profile.py
python3 -m pytest -q -x tests/test_fast_launch.py -p no:cacheprovider > $OUT/tests.txt 2>&1; tail -3 $OUT/tests.txt
python3 $P --preset olmoe-1b-7b --tokens 1 64 --top 30 --ab fast-launch > $OUT/olmoe_fwd.txt 2>&1
grep '^==' $OUT/olmoe_fwd.txt
python3 $P --preset olmoe-1b-7b --tokens 1 --mode train --top 30 --ab fast-launch > $OUT/olmoe_train.txt 2>&1
grep '^==' $OUT/olmoe_train.txt
python3 $P --preset qwen3-30b-a3b --tokens 1 --top 0 --ab fast-launch > $OUT/qwen_fwd.txt 2>&1
grep '^==' $OUT/qwen_fwd.txt
python3 $P --impl hf-olmoe:batched_mm --preset olmoe-1b-7b --tokens 1 --top 0 > $OUT/hf_fwd.txt 2>&1
grep '^==' $OUT/hf_fwd.txt
