//! Integration tests: the real `whippet` binary, real sockets, exact values.

mod support;

mod bad_input;
mod capture;
mod docs;
mod e2e;
mod egress;
mod enrichment;
mod faults;
mod fuzz_corpus;
mod intake;
mod layers;
mod lifecycle;
mod ops;
mod shaping;
mod stops;
mod transports;
