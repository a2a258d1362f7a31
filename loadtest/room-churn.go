// Room churn: N members join one debate room (eight at a time, each its own user; the moderator,
// who made the room, joined first; with -rooms R, R other rooms each have a socket in them, so
// the server holds them in memory), then every member's socket closes at once, then the other
// rooms' sockets. Prints the server's CPU and the wall time for the joins, for the members'
// leaves (until its /metrics shows only the other rooms' and the moderator's sockets open) and
// for the other rooms' sockets closing: what a room's size, and the number of rooms, cost each
// join and leave (#26). Run by loadtest/run-room-churn.sh.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

func procCPU(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / 100
}
func jwt(secret, sub string) string {
	e := base64.RawURLEncoding
	h := e.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`))
	p := e.EncodeToString([]byte(fmt.Sprintf(`{"sub":"%s","exp":%d}`, sub, time.Now().Add(time.Hour).Unix())))
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(h + "." + p))
	return h + "." + p + "." + e.EncodeToString(m.Sum(nil))
}
func open(port int) int {
	r, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	if err != nil {
		return -1
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "parley_sockets_open") {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			return int(v)
		}
	}
	return -2
}

func post(port int, token, path, body string) []byte {
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d%s", port, path), strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Println("POST", path, "failed:", err)
		os.Exit(1)
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if r.StatusCode != 201 {
		fmt.Println("POST", path, r.StatusCode, string(b))
		os.Exit(1)
	}
	return b
}

func id(body []byte) string {
	k := bytes.Index(body, []byte(`"id":"`))
	e := bytes.IndexByte(body[k+6:], '"')
	return string(body[k+6 : k+6+e])
}

// Debate rooms of two clones the moderator made, open to anyone with their ids.
func makeRooms(port int, secret string, count int) []string {
	t := jwt(secret, "mod")
	ada := id(post(port, t, "/v1/clones", `{"name":"Ada"}`))
	bob := id(post(port, t, "/v1/clones", `{"name":"Bob"}`))
	rooms := make([]string, count)
	for i := range rooms {
		rooms[i] = id(post(port, t, "/v1/rooms", fmt.Sprintf(`{"kind":"debate","topic":"Is cheese a dessert?","clones":[{"clone":"%s","stance":"yes"},{"clone":"%s","stance":"no"}],"rounds":1,"turn_policy":"round_robin","visibility":"link"}`, ada, bob)))
	}
	return rooms
}

// A new socket of user `sub`, joined to `room` (its room.state read).
func join(port int, secret, sub, room string) *websocket.Conn {
	d := websocket.Dialer{}
	c, _, err := d.Dial(fmt.Sprintf("ws://127.0.0.1:%d/v1/ws?token=%s", port, jwt(secret, sub)), nil)
	if err != nil {
		fmt.Println("dial failed", err)
		os.Exit(1)
	}
	c.ReadMessage()
	c.WriteMessage(websocket.TextMessage, []byte(fmt.Sprintf(`{"type":"room.join","id":"j","room":"%s"}`, room)))
	for {
		_, m, err := c.ReadMessage()
		if err != nil || bytes.Contains(m, []byte(`"error"`)) {
			fmt.Println("join failed", err, string(m))
			os.Exit(1)
		}
		if bytes.Contains(m, []byte(`"room.state"`)) {
			return c
		}
	}
}

func main() {
	port := flag.Int("port", 0, "")
	n := flag.Int("n", 1000, "members besides the moderator")
	pid := flag.Int("server-pid", 0, "")
	secret := flag.String("secret", "", "")
	others := flag.Int("rooms", 0, "other rooms, a socket in each (held in the server's memory)")
	flag.Parse()
	rooms := makeRooms(*port, *secret, 1+*others)
	room := rooms[0]
	mod := join(*port, *secret, "mod", room)
	holders := make([]*websocket.Conn, 0, *others)
	for i, other := range rooms[1:] {
		holders = append(holders, join(*port, *secret, fmt.Sprintf("h%d", i), other))
	}
	go func() {
		for {
			if _, _, err := mod.ReadMessage(); err != nil {
				return
			}
		}
	}()
	conns := make([]*websocket.Conn, *n)
	cpu0, t0 := procCPU(*pid), time.Now()
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < *n; i += 8 {
				conns[i] = join(*port, *secret, fmt.Sprintf("m%d", i), room)
			}
		}(w)
	}
	wg.Wait()
	cpu1, t1 := procCPU(*pid), time.Now()
	for _, c := range conns {
		c.UnderlyingConn().Close()
	}
	for open(*port) > 1+len(holders) {
		time.Sleep(5 * time.Millisecond)
	}
	cpu2, t2 := procCPU(*pid), time.Now()
	// Then the other rooms' sockets close at once, each leaving its own room.
	for _, c := range holders {
		c.UnderlyingConn().Close()
	}
	for open(*port) > 1 {
		time.Sleep(5 * time.Millisecond)
	}
	cpu3, t3 := procCPU(*pid), time.Now()
	fmt.Printf("rooms=%d members=%d join_cpu_s=%.2f join_wall_s=%.2f leave_cpu_s=%.2f leave_wall_s=%.2f others_close_cpu_s=%.2f others_close_wall_s=%.2f\n",
		1+*others, *n, cpu1-cpu0, t1.Sub(t0).Seconds(), cpu2-cpu1, t2.Sub(t1).Seconds(), cpu3-cpu2, t3.Sub(t2).Seconds())
}
