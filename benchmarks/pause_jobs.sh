#!/bin/bash
# Pause (STOP) or resume (CONT) the training and test jobs sharing this machine, for a benchmark's
# timed rounds: benchmarks/pause_jobs.sh STOP | CONT. The [.] keeps pgrep from matching its own
# command line (and a benchmark whose arguments name this script).
for pid in $(pgrep -f 'train_quality[.]py|finetune_minilm[.]py|bin/pytest|-m pytest'); do
    kill "-$1" "$pid"
done
