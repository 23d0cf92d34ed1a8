#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kappakv_fuzz::entry(data));
