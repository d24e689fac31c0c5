# A minutes-long CPU smoke run of the whole ARC path on the 20 tasks shipped in assets/arc: training, the
# evaluation's voting (pass@1, pass@2) and out-arc-tiny/submission.json. A 0.13M-parameter HRM will not solve
# ARC; it checks that everything runs.
#   python prepare_arc.py --source=sample --num_aug=8
#   python train.py config/arc_tiny.py
#   python sample.py --out_dir=out-arc-tiny --arc_task=6ea4a07e
out_dir = 'out-arc-tiny'
dataset = 'arc-sample-aug-8'
global_batch_size = 8
max_steps = 100
eval_interval = 50
log_interval = 25

H_cycles = 1
L_cycles = 2
H_layers = 1
L_layers = 1
hidden_size = 64
num_heads = 2
puzzle_emb_ndim = 64
halt_max_steps = 2

learning_rate = 1e-3
warmup_steps = 50
weight_decay = 0.1
puzzle_emb_lr = 1e-2
puzzle_emb_weight_decay = 0.1
compile = False
