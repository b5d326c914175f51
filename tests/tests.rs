mod support;
mod support_selftest;
