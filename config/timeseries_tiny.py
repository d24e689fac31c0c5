# About a minute on a CPU: a small forecasting HRM on the synthetic series (`python prepare_timeseries.py` builds
# it), 96 hours of history -> the next 24. It should beat the last-value forecast by far and come near
# DLinear, which train.py prints beside it. `python train.py config/timeseries_tiny.py`
out_dir = 'out-timeseries-tiny'
dataset = 'synthetic'
input_len = 96
horizon = 24
global_batch_size = 64
max_steps = 600
eval_interval = 200
log_interval = 50

H_cycles = 1
L_cycles = 2
H_layers = 1
L_layers = 1
hidden_size = 64
num_heads = 2
halt_max_steps = 2

learning_rate = 1e-3
warmup_steps = 50
weight_decay = 0.01
compile = False
