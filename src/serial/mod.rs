//! The serial side: protocol v1 framing and the port reader.

pub mod frame;
pub mod reader;
