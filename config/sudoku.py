# The HRM paper's Sudoku-Extreme-1k recipe: 1,000 hard puzzles, each seen under 1,000 random symmetry
# transformations, the 27M-parameter HRM (hidden 512, 4 + 4 layers, H_cycles = L_cycles = 2, up to 16 ACT
# segments). Build the data with `python prepare_sudoku.py`, then `python train.py config/sudoku.py`.
out_dir = 'out-sudoku'
dataset = 'sudoku-extreme-1k-aug-1000'
global_batch_size = 384     # one GPU; the paper used 768 on 8 GPUs
epochs = 20000              # 20,000 x 1,000 groups / 384 = 52k steps
eval_interval = 5000
log_interval = 100

H_cycles = 2
L_cycles = 2
H_layers = 4
L_layers = 4
hidden_size = 512
num_heads = 8
expansion = 4.0
pos_encodings = 'rope'
puzzle_emb_ndim = 512
halt_max_steps = 16
halt_exploration_prob = 0.1

learning_rate = 1e-4
warmup_steps = 2000
lr_min_ratio = 1.0
weight_decay = 1.0
puzzle_emb_lr = 1e-4
puzzle_emb_weight_decay = 1.0
