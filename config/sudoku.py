# The HRM paper's Sudoku-Extreme-1k recipe: 1,000 hard puzzles, each seen under 1,000 random symmetry
# transformations. train.py's defaults are this recipe's model (the 27M-parameter HRM: hidden 512, 4 + 4
# layers, H_cycles = L_cycles = 2, up to 16 ACT segments, a 512-wide puzzle embedding) and optimizers
# (Adam-atan2 and SignSGD, lr 1e-4 and weight decay 1.0 for both, 2,000 warmup steps, constant after).
# Build the data with `python prepare_sudoku.py`, then `python train.py config/sudoku.py`.
out_dir = 'out-sudoku'
dataset = 'sudoku-extreme-1k-aug-1000'
global_batch_size = 384     # one GPU; the paper used 768 on 8 GPUs
epochs = 20000              # 20,000 x 1,000 groups / 384 = 52k steps
eval_interval = 5000
