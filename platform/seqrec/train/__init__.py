"""Training of the ID models (SASRec, Bert4Rec / Flare ID) on Ray Train: DDP or DeepSpeed, packing, checkpoints."""
