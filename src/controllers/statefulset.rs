//! (being written)

use std::sync::Arc;

use crate::controllers::Context;

pub fn start(_ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    Vec::new()
}
