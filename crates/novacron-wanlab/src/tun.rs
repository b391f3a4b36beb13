//! TUN devices inside network namespaces.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use nix::sched::CloneFlags;

const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const IFNAMSIZ: usize = 16;

// TUNSETIFF = _IOW('T', 202, int); it takes a struct ifreq (name, flags).
nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, [u8; 40]);

/// Opens the persistent TUN device `dev` of namespace `netns` (made with
/// `ip tuntap add`). Packets are raw IP, without the packet-info header.
pub fn open_in_netns(netns: &str, dev: &str) -> io::Result<File> {
    if dev.len() >= IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "device name too long"));
    }
    let netns = netns.to_string();
    let dev = dev.to_string();
    // setns changes the calling thread only: do it on a thread of its own.
    std::thread::spawn(move || {
        let ns = File::open(format!("/var/run/netns/{netns}"))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
        let mut ifreq = [0u8; 40];
        ifreq[..dev.len()].copy_from_slice(dev.as_bytes());
        ifreq[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: `ifreq` is a 40-byte struct ifreq that outlives the call, and
        // the descriptor is an open /dev/net/tun; TUNSETIFF only reads it.
        #[allow(unsafe_code)]
        unsafe { tunsetiff(tun.as_raw_fd(), &ifreq) }.map_err(io::Error::from)?;
        Ok(tun)
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}
