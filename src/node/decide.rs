//! Reconnect decision (written by a helper).
