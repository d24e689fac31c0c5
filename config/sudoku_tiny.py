# A minute-long smoke run of the whole pipeline on a CPU: a 0.13M-parameter HRM on the Sudoku data.
# It will not solve Sudoku; it checks that everything runs. `python train.py config/sudoku_tiny.py`
out_dir = 'out-sudoku-tiny'
dataset = 'sudoku-extreme-1k-aug-1000'
global_batch_size = 32
max_steps = 300
eval_interval = 150
eval_max_examples = 256
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
