"""Ray Tune sweeps over the Ray Train trainer (grid files in configs/grids/, `seqrec tune`)."""
