pub mod leases;
pub mod transfer;
pub mod ucx;
pub mod wire;
