// A copy of ../shared/bench-peers/fanspread.go (read-only there) with -coalesce: the Parley members ask
// for joined tokens (`?coalesce=tokens`, protocol/PROTOCOL.md) and a frame of tokens `from`..`seq`
// counts as each of them arriving with it; wire_frames says how many frames carried them. Without
// -coalesce it measures exactly what the shared client does. run.sh beside it says how to run it.
//
// Fan-out client for side-by-side runs: the same client, the same metric, against the minimal peers
// (go_server.go, node_server.js, py_server.py: "start:<tokens>:<interval_us>") and against Parley's
// debate rooms (-parley: members join a room; the moderator, the first socket, starts it).
// Metric: a token's spread delay at a member = its arrival there minus its first arrival at any member,
// i.e. how long one broadcast takes to reach everyone. Also server CPU per delivered frame and RSS.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

func procCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / 100
}
func procRSS(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			v, _ := strconv.Atoi(strings.Fields(l)[1])
			return v
		}
	}
	return 0
}
func jwt(secret, sub string) string {
	e := base64.RawURLEncoding
	h := e.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	p := e.EncodeToString([]byte(fmt.Sprintf(`{"sub":"%s","exp":%d}`, sub, time.Now().Add(time.Hour).Unix())))
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(h + "." + p))
	return h + "." + p + "." + e.EncodeToString(m.Sum(nil))
}
func field(m []byte, key string) []byte {
	k := bytes.Index(m, []byte(`"`+key+`":`))
	if k < 0 {
		return nil
	}
	j := k + len(key) + 3
	if j < len(m) && m[j] == '"' {
		e := bytes.IndexByte(m[j+1:], '"')
		return m[j+1 : j+1+e]
	}
	e := j
	for e < len(m) && m[e] >= '0' && m[e] <= '9' {
		e++
	}
	return m[j:e]
}

type arrival struct {
	key string
	t   int64
}

func main() {
	url := flag.String("url", "ws://127.0.0.1:9000/ws", "")
	n := flag.Int("n", 1000, "sockets")
	tokens := flag.Int("tokens", 200, "token frames each member must get")
	iv := flag.Int("interval-us", 20000, "peers only")
	pid := flag.Int("server-pid", 0, "")
	timeout := flag.Duration("timeout", 120*time.Second, "")
	parley := flag.Bool("parley", false, "")
	secret := flag.String("secret", "", "Parley JWT secret")
	moderator := flag.String("moderator", "mod", "")
	room := flag.String("room", "", "")
	coalesce := flag.Bool("coalesce", false, "Parley: ask for joined tokens")
	breakdown := flag.Bool("breakdown", false, "also print (to stderr) the mean spread by tenth of the members and by member parity (the server's event loop when it has two), and percentiles of each token's largest spread")
	flag.Parse()
	conns := make([]*websocket.Conn, *n)
	d := websocket.Dialer{ReadBufferSize: 65536}
	for i := range conns {
		u := *url
		if *parley {
			sub := fmt.Sprintf("m%d", i)
			if i == 0 {
				sub = *moderator
			}
			u += "?token=" + jwt(*secret, sub)
			if *coalesce {
				u += "&coalesce=tokens"
			}
		}
		c, _, err := d.Dial(u, nil)
		if err != nil {
			fmt.Println("dial failed at", i, err)
			os.Exit(1)
		}
		conns[i] = c
		if *parley {
			c.ReadMessage() // welcome
			c.WriteMessage(websocket.TextMessage, []byte(fmt.Sprintf(`{"type":"room.join","id":"j%d","room":"%s"}`, i, *room)))
			for {
				_, m, err := c.ReadMessage()
				if err != nil {
					fmt.Println("join failed at", i, err)
					os.Exit(1)
				}
				if bytes.Contains(m, []byte(`"room.state"`)) {
					break
				}
				if bytes.Contains(m, []byte(`"error"`)) {
					fmt.Println("join error at", i, string(m))
					os.Exit(1)
				}
			}
		}
	}
	rssConnected := procRSS(*pid)
	arr := make([][]arrival, *n)
	wire := make([]int, *n)
	var wg sync.WaitGroup
	deadline := time.Now().Add(*timeout)
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c *websocket.Conn) {
			defer wg.Done()
			c.SetReadDeadline(deadline)
			a := make([]arrival, 0, *tokens)
			for len(a) < *tokens {
				_, m, err := c.ReadMessage()
				if err != nil {
					break
				}
				now := time.Now().UnixNano()
				if !bytes.Contains(m, []byte(`"type":"token"`)) {
					continue
				}
				wire[i]++
				stream := string(field(m, "stream"))
				last, _ := strconv.Atoi(string(field(m, "seq")))
				first := last
				if f := field(m, "from"); f != nil {
					first, _ = strconv.Atoi(string(f))
				}
				for s := first; s <= last; s++ {
					a = append(a, arrival{stream + ":" + strconv.Itoa(s), now})
				}
			}
			arr[i] = a
		}(i, c)
	}
	cpu0 := procCPU(*pid)
	t0 := time.Now()
	if *parley {
		conns[0].WriteMessage(websocket.TextMessage, []byte(fmt.Sprintf(`{"type":"room.control","id":"go","room":"%s","action":"start"}`, *room)))
	} else {
		conns[0].WriteMessage(websocket.TextMessage, []byte(fmt.Sprintf("start:%d:%d", *tokens, *iv)))
	}
	wg.Wait()
	el := time.Since(t0).Seconds()
	cpu1 := procCPU(*pid)
	rssEnd := procRSS(*pid)
	first := map[string]int64{}
	total, frames := 0, 0
	for _, w := range wire {
		frames += w
	}
	for _, a := range arr {
		total += len(a)
		for _, x := range a {
			if f, ok := first[x.key]; !ok || x.t < f {
				first[x.key] = x.t
			}
		}
	}
	var d2 []int64
	for _, a := range arr {
		for _, x := range a {
			d2 = append(d2, x.t-first[x.key])
		}
	}
	if *breakdown {
		printBreakdown(arr, wire, first)
	}
	sort.Slice(d2, func(a, b int) bool { return d2[a] < d2[b] })
	p := func(q float64) float64 {
		if len(d2) == 0 {
			return -1
		}
		return float64(d2[int(q*float64(len(d2)-1))]) / 1e6
	}
	fmt.Printf("wire_frames=%d ", frames)
	fmt.Printf("delivered=%d expected=%d secs=%.2f frames_per_s=%.0f spread_p50_ms=%.2f spread_p99_ms=%.2f spread_max_ms=%.2f server_cpu_s=%.2f server_us_per_frame=%.2f rss_kb_connected=%d rss_kb_end=%d\n",
		total, *n**tokens, el, float64(total)/el, p(0.5), p(0.99), p(1.0), cpu1-cpu0, (cpu1-cpu0)*1e6/float64(total+1), rssConnected, rssEnd)
}

// printBreakdown says where the spread lies: by tenth of the members (in dial order), by member
// parity (a server with two event loops takes accepted sockets in turn) and, per token, the spread
// of its last member.
func printBreakdown(arr [][]arrival, wire []int, first map[string]int64) {
	var tenth [10]float64
	var inTenth [10]int
	var parity [2]float64
	var inParity, framesParity [2]int
	worst := map[string]int64{}
	for i, a := range arr {
		for _, x := range a {
			d := x.t - first[x.key]
			tenth[i*10/len(arr)] += float64(d) / 1e6
			inTenth[i*10/len(arr)]++
			parity[i%2] += float64(d) / 1e6
			inParity[i%2]++
			if d > worst[x.key] {
				worst[x.key] = d
			}
		}
		framesParity[i%2] += wire[i]
	}
	for k := range tenth {
		fmt.Fprintf(os.Stderr, "members tenth %d: mean spread %.2f ms\n", k, tenth[k]/float64(atLeastOne(inTenth[k])))
	}
	for k := range parity {
		fmt.Fprintf(os.Stderr, "members %d mod 2: mean spread %.2f ms, %d frames\n", k, parity[k]/float64(atLeastOne(inParity[k])), framesParity[k])
	}
	var last []float64
	for _, v := range worst {
		last = append(last, float64(v)/1e6)
	}
	if len(last) == 0 {
		return
	}
	sort.Float64s(last)
	fmt.Fprintf(os.Stderr, "a token's last member: spread p10 %.1f p50 %.1f p90 %.1f max %.1f ms\n",
		last[len(last)/10], last[len(last)/2], last[len(last)*9/10], last[len(last)-1])
}

func atLeastOne(n int) int {
	if n < 1 {
		return 1
	}
	return n
}
