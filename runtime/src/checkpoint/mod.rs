//! Checkpoints that are either complete and verified, or passed over.
//!
//! [`Checkpoints`] keeps a folder of `step-{step:010}/` checkpoints. A save writes every file
//! and then a `manifest.json` with each file's size and SHA-256 into a temporary folder,
//! syncs them, and renames the folder into place: a process killed at any point leaves the
//! previous checkpoints intact. [`Checkpoints::latest`] returns the newest checkpoint that
//! verifies against its manifest and says why each newer one was passed over.
//!
//! Tensors are stored as `.safetensors` files ([`encode_safetensors`]), which PyTorch reads
//! with `safetensors.torch.load_file`, and go back into a `VarStore` with [`load_into`], which
//! changes nothing unless every variable has a tensor of its name, shape and dtype.
//!
//! ```no_run
//! use stepguard::checkpoint::{self, Checkpoints};
//! use tch::{nn, Device};
//!
//! # fn main() -> Result<(), checkpoint::CheckpointError> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! let _net = nn::linear(vs.root() / "fc", 4, 2, Default::default());
//! let store = Checkpoints::new("checkpoints").keep(3);
//!
//! let model = checkpoint::encode_safetensors(&checkpoint::var_store_tensors(&vs))?;
//! store.save(100, vec![("model.safetensors".into(), model.into())], serde_json::json!({"lr": 0.1}))?;
//!
//! if let Some(found) = store.latest()? {
//!     for r in &found.rejected {
//!         eprintln!("passed over {r}");
//!     }
//!     let bytes = found.checkpoint.read("model.safetensors")?;
//!     checkpoint::load_into(&vs, checkpoint::decode_safetensors(&bytes)?)?;
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod layout;
mod load;
mod ranks;
mod run;
mod safetensors;
mod store;
mod verify;

pub use self::error::{CheckpointError, Rejected};
pub use self::load::{load_into, var_store_tensors};
pub use self::run::{OptimizerState, Resumed};
pub use self::safetensors::{decode_safetensors, encode_safetensors};
pub use self::store::{load, Checkpoints, Contents, FileWriter, Latest};
pub use self::verify::{Checkpoint, FileEntry};

#[cfg(test)]
mod tests;
