//! OX, the Object Exchange: moves volumes to and from S3-compatible object stores.
//!
//! Not built yet: the object format, codec, keys, stores, snapshot encoder and clone
//! basis arrive with the "OX core" and "snapshots and clones" issues. This crate exists
//! now so the workspace has its final shape and dependency directions.
