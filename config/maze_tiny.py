# A couple of minutes' CPU smoke run of the whole maze path on 15x15 generated mazes: training, the
# evaluation's path checks, then sample.py. A 0.13M-parameter HRM will not solve mazes; it checks that
# everything runs.
#   python prepare_maze.py --size=15 --write_csv=mazes15
#   python train.py config/maze_tiny.py
#   python sample.py --out_dir=out-maze-tiny --maze=mazes15/test.csv --max_puzzles=2
out_dir = 'out-maze-tiny'
dataset = 'maze-15x15-gen-1k'
global_batch_size = 32
max_steps = 200
eval_interval = 100
eval_max_examples = 64
log_interval = 50

H_cycles = 2
L_cycles = 2
H_layers = 1
L_layers = 1
hidden_size = 64
num_heads = 2
puzzle_emb_ndim = 64
halt_max_steps = 4

learning_rate = 1e-3
warmup_steps = 50
weight_decay = 0.1
puzzle_emb_lr = 1e-3
puzzle_emb_weight_decay = 0.1
compile = False
