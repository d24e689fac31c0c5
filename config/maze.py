# The HRM paper's Maze-Hard recipe: 1,000 30x30 mazes whose shortest path takes more than 110 steps, the
# 27M-parameter model of train.py's defaults, its optimizers at lr 1e-4 and weight decay 1.0 for the weights
# and the puzzle embedding, up to 16 ACT segments (train.py's defaults), 20,000 epochs of batch 384 (set here
# with the data, the evaluation interval and out_dir). Build the data with `python prepare_maze.py`
# (generated, offline; or `--source=hf` for the original's mazes, then add --dataset=maze-30x30-hard-1k), then
# `python train.py config/maze.py`. On 8 GPUs, as the paper:
# torchrun --standalone --nproc_per_node=8 train.py config/maze.py --global_batch_size=768
out_dir = 'out-maze'
dataset = 'maze-30x30-gen-1k'
global_batch_size = 384     # one GPU: about 45 GB of activations at 901 tokens (768 would need about 90)
epochs = 20000              # 20,000 x 1,000 mazes / 384 = 52k steps
eval_interval = 5000        # about every 2,000 epochs, as the original
