# Maze-solving in minutes on one GPU: 15x15 mazes (shortest paths longer than 28 steps) and the recipe's
# model, optimizers and batch of 384, for 3,000 steps with a short warmup (about 6 minutes on an H200:
# 116 ms a step), an evaluation every 500. `python prepare_maze.py --size=15`, then
# `python train.py config/maze_small.py`.
out_dir = 'out-maze-small'
dataset = 'maze-15x15-gen-1k'
max_steps = 3000            # the lr is constant after warmup: stopping early changes nothing else
warmup_steps = 300
eval_interval = 500
