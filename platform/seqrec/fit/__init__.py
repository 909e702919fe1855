"""`seqrec fit`: any prepared dataset in, a model selected on validation out, within a time budget."""
