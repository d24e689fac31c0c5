# Maze-solving in minutes on one GPU: 15x15 mazes (shortest paths longer than 28 steps), the recipe's
# model and optimizers, 5,000 steps with a short warmup, an evaluation every 1,000 steps.
# `python prepare_maze.py --size=15`, then `python train.py config/maze_small.py`.
out_dir = 'out-maze-small'
dataset = 'maze-15x15-gen-1k'
global_batch_size = 384
epochs = 1920               # 1,920 x 1,000 mazes / 384 = 5,000 steps
warmup_steps = 500
eval_interval = 1000
