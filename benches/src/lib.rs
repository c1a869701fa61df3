//! Load benchmark support (see issue load bench).
