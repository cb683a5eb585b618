//! NVMe over Fabrics, TCP transport: the target that serves bdevs to NVMe/TCP hosts.
//!
//! Not built yet: arrives with the "NVMe/TCP target" issue.
