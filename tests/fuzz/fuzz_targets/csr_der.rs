#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_tests::fuzz::csr_der(data));
