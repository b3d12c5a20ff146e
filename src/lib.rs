pub mod pb;
pub mod tls;
