# ETTh1, the literature's benchmark: all 7 variables in and out (multivariate), 96 hours of history -> the
# next 96, the standard split (12/4/4 months), errors on the scale normalised by the training months.
# `python prepare_timeseries.py --csv=ETTh1.csv` (or --source=ett) first; then `python train.py config/etth1.py`.
# Every evaluation (each epoch) prints validation and test MSE/MAE beside DLinear's and the last value's.
out_dir = 'out-etth1'
dataset = 'etth1'
input_len = 96
horizon = 96
global_batch_size = 256
epochs = 6                  # 33 steps each; on a 12-epoch schedule validation got worse after 3-4
eval_interval = 33
log_interval = 33

H_cycles = 2
L_cycles = 2
H_layers = 2
L_layers = 2
hidden_size = 128
num_heads = 2
halt_max_steps = 2

learning_rate = 1e-3
warmup_steps = 50
lr_min_ratio = 0.1
weight_decay = 0.1
