"""Ready-made filters in the original product's sections, each with what it catches
and what it cannot.

A preset is an expression in the filter language, parsed by the same parser as a
user's filter (a test compiles every one and matches it against a crafted packet). A
filter sees one packet at a time: a preset can pick out the packets a sweep or a beacon
is made of, but not count them or time them (the "cannot" texts say so where it matters).
"""

from __future__ import annotations

from dataclasses import dataclass

from secvf.errors import NotFound


@dataclass(frozen=True)
class Preset:
    """One named filter."""

    name: str  # what --preset takes
    section: str  # one of SECTIONS
    expression: str  # in the filter language
    catches: str  # what it shows
    cannot: str  # what it misses (one line)


SECTIONS = ("C2 detection", "Data exfil", "TLS", "Recon & scanning", "Lateral movement",
            "Protocols")

_PRIVATE = "{10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7 fe80::/10}"

PRESETS: tuple[Preset, ...] = (
    Preset("dns-long-names", "C2 detection",
           "dns and not dns.flags.response and dns.qry.name.len > 50",
           "DNS queries for long names: tunnelling and encoded beacons",
           "tunnels with short names, DNS over HTTPS/TLS, the timing of beacons"),
    Preset("dns-txt", "C2 detection", "dns.qry.type in {TXT NULL ANY}",
           "TXT/NULL/ANY queries, the record types DNS command channels use",
           "C2 over A/AAAA/CNAME answers; legitimate TXT lookups (SPF, DKIM) look the same"),
    Preset("uncommon-ports", "C2 detection",
           "(tcp.flags.syn == 1 and tcp.flags.ack == 0 and not tcp.dstport in "
           "{20..25 53 80 110 143 443 465 587 993 995 8080 8443}) or (udp and not "
           "udp.port in {53 67 68 123 137 138 5353 5355 1900})",
           "new TCP connections and UDP to ports outside the common services",
           "C2 on 80/443/53 (the usual case); established connections' later packets"),
    Preset("irc", "C2 detection", "tcp.port in {6660..6669 6697}",
           "IRC, an old botnet control channel", "IRC on other ports"),
    Preset("http-odd-port", "C2 detection", "http.request and not tcp.dstport in {80 8080}",
           "plaintext HTTP requests to ports other than 80/8080",
           "HTTP whose first packet is split mid request line; HTTPS"),
    Preset("http-post", "Data exfil", 'http.request.method == "POST" or '
           'http.request.method == "PUT"',
           "plaintext HTTP uploads (POST/PUT request lines)",
           "uploads over TLS, or over GET query strings"),
    Preset("dns-outside-resolver", "Data exfil",
           f"dns and not dns.flags.response and not ip.dst in {_PRIVATE}",
           "DNS queries to resolvers outside private ranges (not the network's own)",
           "DNS over HTTPS/TLS; a rogue resolver inside a private range"),
    Preset("icmp-large", "Data exfil", "(icmp or icmpv6) and frame.len > 200",
           "ICMP messages with large bodies: ICMP tunnels",
           "tunnels that keep each message small"),
    Preset("ftp-tftp", "Data exfil", "tcp.port in {20 21} or udp.port == 69",
           "FTP control/data and TFTP", "FTPS and passive-mode data on high ports"),
    Preset("tls-client-hello", "TLS", "tls.handshake.type == client_hello",
           "every TLS ClientHello (the start of each TLS session)",
           "QUIC (TLS inside UDP); resumed sessions without a full hello"),
    Preset("tls-no-sni", "TLS", "tls.handshake.type == client_hello and not tls.sni",
           "ClientHellos without a server name: connections to bare IPs, some malware",
           "ECH (the real name is encrypted, an outer SNI remains)"),
    Preset("tls-sni", "TLS", "tls.sni", "ClientHellos that name a server (SNI present)",
           "ClientHellos split over several TCP segments (the SNI is not in the first)"),
    Preset("tls-odd-port", "TLS",
           "tls.handshake.type == client_hello and not tcp.dstport in "
           "{443 465 636 853 993 995 8443}",
           "TLS sessions on ports where TLS is unusual",
           "TLS on 443 (where C2 prefers to be)"),
    Preset("syn-scan", "Recon & scanning", "tcp.flags.syn == 1 and tcp.flags.ack == 0",
           "SYN-only packets: connection attempts, many to one host is a port scan",
           "whether it is a scan (needs counting), connect() scans' completed handshakes"),
    Preset("stealth-scan", "Recon & scanning", "tcp.flags in {0x00 0x01 0x29}",
           "NULL, FIN-only and XMAS (FIN+PSH+URG) probes",
           "SYN and connect() scans (see syn-scan)"),
    Preset("closed-port-replies", "Recon & scanning",
           "tcp.flags.reset == 1 or (icmp.type == 3 and icmp.code == 3)",
           "TCP resets and ICMP port-unreachable: what a scan of closed ports draws",
           "filtered ports, which answer nothing"),
    Preset("arp-sweep", "Recon & scanning", "arp.opcode == request",
           "ARP who-has requests, which a sweep of the segment is made of",
           "telling a sweep from normal address resolution (needs counting)"),
    Preset("icmp-sweep", "Recon & scanning", "icmp.type == 8 or icmpv6.type == 128",
           "ICMP echo requests: ping sweeps", "sweeps by ARP or TCP (see the others)"),
    Preset("smb", "Lateral movement", "tcp.port in {139 445}",
           "SMB and NetBIOS sessions (file shares, PsExec, remote services)",
           "SMB over QUIC (UDP 443)"),
    Preset("rdp", "Lateral movement", "tcp.port == 3389 or udp.port == 3389",
           "Remote Desktop", "RDP moved to another port or tunnelled"),
    Preset("winrm", "Lateral movement", "tcp.port in {5985 5986}",
           "WinRM / PowerShell remoting (HTTP and HTTPS)", "WinRM on custom ports"),
    Preset("ssh", "Lateral movement", "tcp.port == 22", "SSH", "SSH on another port"),
    Preset("rpc-kerberos-ldap", "Lateral movement",
           "tcp.port in {88 135 389 636 3268} or udp.port in {88 389}",
           "Kerberos, DCE/RPC endpoint mapper and LDAP: directory and credential traffic",
           "RPC on its dynamic high ports"),
    Preset("telnet-vnc", "Lateral movement", "tcp.port in {23 5900..5910}",
           "Telnet and VNC", "either on a non-standard port"),
    Preset("dns", "Protocols", "dns", "DNS, mDNS and LLMNR", "DNS over HTTPS/TLS"),
    Preset("dhcp", "Protocols", "dhcp",
           "DHCP: which VM asked for which address, and its host name", "DHCPv6"),
    Preset("ntp", "Protocols", "ntp", "NTP time requests and replies",
           "NTP on other ports, or shorter than a standard NTP packet"),
    Preset("arp", "Protocols", "arp", "all ARP", "IPv6 neighbour discovery (ICMPv6)"),
    Preset("icmp", "Protocols", "icmp or icmpv6", "all ICMP and ICMPv6", "-"),
    Preset("http", "Protocols", "http", "plaintext HTTP request and status lines",
           "HTTP/2, HTTPS, and a request's later segments"),
    Preset("broadcast-discovery", "Protocols",
           "udp.port in {137 138 1900 5353 5355} or eth.dst == ff:ff:ff:ff:ff:ff",
           "NetBIOS, SSDP, mDNS, LLMNR and Ethernet broadcasts: what a host announces",
           "discovery over unicast"),
    Preset("malformed", "Protocols", "malformed",
           "frames some layer of which did not decode: truncated or crafted packets",
           "well-formed packets with malicious content"),
)

assert {p.section for p in PRESETS} == set(SECTIONS), "every section has presets"
assert len({p.name for p in PRESETS}) == len(PRESETS), "preset names are unique"


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        NotFound: no such preset (the message lists them).
    """
    for preset in PRESETS:
        if preset.name == name:
            return preset
    raise NotFound(f"no packet preset {name!r}; the presets are: "
                   + ", ".join(p.name for p in PRESETS) + " (secvf packets --preset list)")
