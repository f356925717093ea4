//! Rendering for the command line: what the `membridge` subcommands print,
//! kept apart from the modules that produce the data. It sits above every other
//! module and nothing below it imports it.

pub mod lease;
