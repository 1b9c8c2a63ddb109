//! The differential test's parts: the world and its steps, the model, the generator, and the
//! database the generator writes.

pub mod database;
pub mod generator;
pub mod model;
pub mod world;
