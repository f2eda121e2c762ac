//! Training: the optimizer so far; the run config, trainer loop and checkpoints come with the
//! trainer issue.

pub mod optim;
