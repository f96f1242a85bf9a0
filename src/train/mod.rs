//! Training: batches, optimizer and the run loop. The trainer knows no method by name.
pub mod batch;
pub mod evaluation;
pub mod optim;
pub mod supervised;
pub mod trainer;
