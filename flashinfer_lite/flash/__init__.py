"""Flash-resident FFN weights: calibration, the neuron store on flash, the sparse FFN."""
