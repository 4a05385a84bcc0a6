"""Sender authentication of inbound mail: DKIM, SPF and DMARC.

Run at the end of DATA, before the mail is committed and before ``250``:

* DKIM (RFC 6376): every ``DKIM-Signature`` of the message is verified with
  dkimpy, its key record (``selector._domainkey.d``) looked up through our
  resolver. The passing signatures' ``d=`` domains are kept.
* SPF (RFC 7208): pyspf checks the ``MAIL FROM`` domain (the ``HELO`` name
  when ``MAIL FROM`` is empty) against the connecting client's IP (the
  transport's peer). Over LMTP the MTA in front of us talked to the sender,
  and its ``Received`` header is the only trace of the client IP: reading
  it reliably depends on that MTA's format, so SPF is skipped for LMTP
  (``spf: "none"``) and DMARC there rests on DKIM alone.
* DMARC (RFC 7489): the ``_dmarc.`` TXT record of the ``From:`` domain,
  else of its organisational domain (section 3.2, from the Public Suffix
  List snapshot bundled with tldextract; it is never fetched; a name under
  no known suffix takes its last two labels); a subdomain gets the ``sp=``
  policy when the record came from the organisational domain. DMARC passes
  when a passing DKIM ``d=`` or the passing SPF domain is aligned with the
  ``From:`` domain: relaxed (``adkim``/``aspf`` ``r``, the default: the
  same organisational domain) or strict (``s``: the same name). ``pct``
  (6.6.4): a failing mail outside the sampled share gets the next policy
  down (reject -> quarantine -> none), drawn per mail.

Verdict (``decide``): DMARC pass -> ``accept``; DMARC fail and the domain
says ``p=reject`` -> ``reject`` (``550 5.7.1`` at DATA, nothing stored);
DMARC fail with ``p=none``/``quarantine`` -> the room address's own policy
(``unauthenticated`` of ``org.zhome.email_address``: ``reject``,
``quarantine`` or ``mark``, default ``mark``); no DMARC record (or no
``From:`` domain) -> ``mark``: accepted and posted with a visible marker.
Several ``From:`` headers or addresses are refused like ``p=reject`` (RFC
7489 6.6.1): a second address must not hide the first one's policy. The
``From:`` domain is read as mime.py reads it (``policy.default``,
``parseaddr``), so the domain checked is the one the ghost is made of.

DNS: a dnspython ``Resolver`` on the ``email_bridge.dns_servers`` list
(``host:port``), else the system's resolvers, with a timeout per lookup;
lookups block, so ``check`` runs in a thread pool of the bridge's own
(bridge.py, four threads); answers are cached for their TTL. A timeout or SERVFAIL is a ``TemporaryFailure``: the sender is told ``451`` and
retries; mail is never accepted unchecked. pyspf reads DNS through its
module function ``spf.DNSLookup``, which is set here to one that uses the
bridge's resolver (one bridge per process).
"""

from __future__ import annotations

import email.policy
import email.utils
import ipaddress
import logging
import threading
from dataclasses import asdict, dataclass, field
from email.parser import BytesHeaderParser
from typing import Any, Optional

import dkim
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
import tldextract

from zhome.config import split_host_port

logger = logging.getLogger(__name__)

#: Seconds one DNS lookup may take.
LOOKUP_TIMEOUT_S = 5.0
#: DNS answers kept (each for its TTL).
CACHED_ANSWERS = 2000
ROOM_POLICIES = ("reject", "quarantine", "mark")
ACCEPT, MARK, QUARANTINE, REJECT = "accept", "mark", "quarantine", "reject"

_extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


class TemporaryFailure(Exception):
    """A DNS lookup timed out or failed on the server side: try again later."""


class Resolver:
    """TXT and address lookups through the configured resolvers."""

    def __init__(self, servers: tuple[str, ...] = (), timeout: float = LOOKUP_TIMEOUT_S) -> None:
        if servers:
            r = dns.resolver.Resolver(configure=False)
            nameservers: list[str | dns.nameserver.Nameserver] = []
            for s in servers:
                host, port = split_host_port(s)
                nameservers.append(dns.nameserver.Do53Nameserver(host, port))
            r.nameservers = nameservers
        else:
            try:
                r = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                # No system resolvers: every check is a temporary failure
                # (451) until dns_servers names one.
                logger.error("email bridge: no DNS resolvers configured; sender checks fail until"
                             " email_bridge.dns_servers names one")
                r = dns.resolver.Resolver(configure=False)
                r.nameservers = ["127.0.0.1"]
        r.timeout = timeout
        r.lifetime = timeout
        # Answers are kept for their TTL, as any resolver keeps them: mail
        # from one domain asks the same SPF, DMARC and DKIM key records
        # again and again. Failures are not kept (asked again each time).
        r.cache = dns.resolver.LRUCache(max_size=CACHED_ANSWERS)
        self._resolver = r

    def _answer(self, name: str, qtype: str) -> list[Any]:
        try:
            return list(self._resolver.resolve(name, qtype, search=False, raise_on_no_answer=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as e:
            raise TemporaryFailure(type(e).__name__) from None
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong, dns.exception.SyntaxError):
            return []

    def txt(self, name: str) -> list[bytes]:
        """The TXT records of ``name``, each one's strings joined."""
        return [b"".join(r.strings) for r in self._answer(name, "TXT")]

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's lookup shape: ((name, type), value) per record."""
        out: list[tuple[tuple[str, str], Any]] = []
        try:
            answers = self._answer(name, qtype)
        except TemporaryFailure as e:
            raise spf.TempError(f"DNS {e}") from None
        for r in answers:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out


_spf_resolver: list[Resolver] = []
_spf_lock = threading.Lock()


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    return _spf_resolver[0].spf_lookup(name, qtype) if _spf_resolver else []


@dataclass(frozen=True)
class DmarcRecord:
    p: str
    sp: Optional[str]
    adkim: str
    aspf: str
    #: The record was the organisational domain's, not the From: domain's own.
    from_org: bool = False
    #: ``pct=``: the share (0 to 100) of failing mail the policy is for.
    pct: int = 100

    def policy_for_subdomain(self) -> str:
        return self.sp if self.from_org and self.sp else self.p


#: RFC 7489 6.6.4: failing mail left out of the ``pct`` sample gets the
#: next policy down.
_NEXT_DOWN = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def sampled_policy(policy: str, pct: int, draw: float) -> str:
    """The policy applied to a failing mail: ``policy`` when ``draw`` (uniform
    in [0, 1)) falls in the ``pct`` per cent sample, else the next one down."""
    return policy if draw * 100 < pct else _NEXT_DOWN.get(policy, policy)


@dataclass
class AuthResult:
    """What the checks found; stored with the mail and posted as
    ``org.zhome.email.auth``. Holds domains, never addresses."""

    dkim: str = "none"  # pass | fail | none
    dkim_domains: list[str] = field(default_factory=list)
    spf: str = "none"  # pass | fail | softfail | neutral | none | permerror
    spf_domain: Optional[str] = None
    dmarc: str = "none"  # pass | fail | none
    dmarc_policy: Optional[str] = None
    from_domain: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def organisational_domain(domain: str) -> str:
    domain = domain.lower().rstrip(".")
    ext = _extract(domain)
    if ext.suffix and ext.domain:
        return f"{ext.domain}.{ext.suffix}"
    labels = domain.split(".")
    return ".".join(labels[-2:])


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organisational_domain(a) == organisational_domain(b)


def parse_dmarc(text: bytes) -> Optional[dict[str, str]]:
    """The tags of a DMARC record (RFC 7489 6.3), or None if it is not one."""
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    for i, part in enumerate(s.split(";")):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            return None
        k, v = k.strip().lower(), v.strip()
        if i == 0 and (k != "v" or v != "DMARC1"):
            return None
        tags.setdefault(k, v)
    if tags.get("v") != "DMARC1":
        return None
    return tags


def _record(tags: dict[str, str], from_org: bool) -> Optional[DmarcRecord]:
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        # 6.6.3: a record without a valid p= is ignored, unless rua= is
        # given (then p=none); the simpler reading: p=none.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower() or None
    if sp not in (None, "none", "quarantine", "reject"):
        sp = None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    # 6.3: pct is an integer 0-100, default 100; a bad value is the default.
    raw_pct = tags.get("pct", "100")
    pct = int(raw_pct) if raw_pct.isdigit() and 0 <= int(raw_pct) <= 100 else 100
    return DmarcRecord(p, sp, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r",
                       from_org, pct)


def dmarc_record(resolver: Resolver, from_domain: str) -> Optional[DmarcRecord]:
    def lookup(domain: str, from_org: bool) -> Optional[DmarcRecord]:
        found = [t for t in (parse_dmarc(r) for r in resolver.txt(f"_dmarc.{domain}")) if t is not None]
        # 6.6.3: more than one record is no record.
        return _record(found[0], from_org) if len(found) == 1 else None

    rec = lookup(from_domain, False)
    if rec is not None:
        return rec
    org = organisational_domain(from_domain)
    if org != from_domain:
        return lookup(org, True)
    return None


#: ``from_domain_of`` of a mail with several From: headers or addresses.
SEVERAL = "<several>"


def from_domain_of(raw: bytes) -> Optional[str]:
    """The domain of the From: address, read as mime.py reads it (so the
    domain checked is the one the ghost is made from); ``SEVERAL`` when
    there are several From: headers or addresses; None when there is none."""
    try:
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        values = [str(v) for v in (headers.get_all("From") or [])]
    except Exception:
        return None
    if not values:
        return None
    if len(values) > 1 or len([a for a in email.utils.getaddresses(values) if a[1]]) > 1:
        return SEVERAL
    address = email.utils.parseaddr(values[0])[1]
    if "@" not in address:
        return None
    domain = address.rsplit("@", 1)[1].strip().lower().rstrip(".")
    return domain or None


def _dkim_check(resolver: Resolver, raw: bytes) -> tuple[str, list[str]]:
    def dnsfunc(name: bytes | str, timeout: float = LOOKUP_TIMEOUT_S) -> Optional[bytes]:
        n = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = resolver.txt(n.rstrip("."))
        return records[0] if records else None

    try:
        d = dkim.DKIM(raw)
        count = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
    except Exception:
        return "fail", []
    if count == 0:
        return "none", []
    passed: list[str] = []
    for idx in range(min(count, 10)):
        try:
            d = dkim.DKIM(raw)
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
        except TemporaryFailure:
            raise
        except Exception:
            ok = False
        if ok and d.domain:
            passed.append(d.domain.decode("ascii", "replace").lower())
    return ("pass" if passed else "fail"), passed


def _spf_check(resolver: Resolver, client_ip: str, mail_from: str, helo: str) -> tuple[str, Optional[str]]:
    if mail_from and "@" in mail_from:
        domain = mail_from.rsplit("@", 1)[1].lower()
        sender = mail_from
    elif helo:
        domain = helo.lower()
        sender = f"postmaster@{domain}"
    else:
        return "none", None
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        return "none", domain
    with _spf_lock:
        _spf_resolver[:] = [resolver]
        spf.DNSLookup = _spf_dns
    try:
        result, _, _ = spf.query(i=client_ip, s=sender, h=helo or domain, timeout=LOOKUP_TIMEOUT_S * 4).check()
    except spf.TempError:
        raise TemporaryFailure("spf") from None
    except Exception:
        return "permerror", domain
    result = str(result).lower()
    if result == "temperror":
        raise TemporaryFailure("spf")
    return result, domain


def check(resolver: Resolver, raw: bytes, *, client_ip: str, mail_from: str, helo: str,
          run_spf: bool = True) -> AuthResult:
    """Every check on one mail (blocking: run in a thread). Raises
    TemporaryFailure when DNS could not answer."""
    res = AuthResult()
    res.from_domain = from_domain_of(raw)
    res.dkim, res.dkim_domains = _dkim_check(resolver, raw)
    if run_spf:
        res.spf, res.spf_domain = _spf_check(resolver, client_ip, mail_from, helo)
    if res.from_domain is None:
        return res
    if res.from_domain == SEVERAL:
        # RFC 7489 6.6.1: one domain cannot stand for the author; refused
        # (else a second address would hide a p=reject domain).
        res.from_domain = None
        res.dmarc, res.dmarc_policy = "fail", "reject"
        return res
    rec = dmarc_record(resolver, res.from_domain)
    if rec is None:
        return res
    res.dmarc_policy = rec.policy_for_subdomain()
    dkim_ok = any(aligned(d, res.from_domain, rec.adkim) for d in res.dkim_domains)
    spf_ok = res.spf == "pass" and res.spf_domain is not None and aligned(res.spf_domain, res.from_domain,
                                                                           rec.aspf)
    res.dmarc = "pass" if dkim_ok or spf_ok else "fail"
    if res.dmarc == "fail" and rec.pct < 100:
        import secrets

        res.dmarc_policy = sampled_policy(res.dmarc_policy, rec.pct, secrets.randbelow(10_000) / 10_000)
    return res


def decide(result: AuthResult, room_policy: str = MARK) -> str:
    """accept | mark | quarantine | reject, as the module docstring says."""
    if result.dmarc == "pass":
        return ACCEPT
    if result.dmarc == "fail":
        if result.dmarc_policy == "reject":
            return REJECT
        return room_policy if room_policy in ROOM_POLICIES else MARK
    return MARK
