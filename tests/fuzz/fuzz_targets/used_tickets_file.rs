#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::fuzz::used_tickets_file(data));
